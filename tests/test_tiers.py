"""The integration marker is kept honest: a test that starts a process and is not marked ``integration`` fails.

``helpers.IntegrationGuard`` runs here on small test files written for the purpose, in an inner pytest run. The inner
tests start real processes (``true``, a spawned Python), so this module is itself marked ``integration``.
"""

from __future__ import annotations

import pytest
from helpers import IntegrationGuard

pytestmark = pytest.mark.integration

INNER = '''
import multiprocessing
import subprocess

import pytest


@pytest.fixture(scope="module")
def server():
    subprocess.run(["true"], check=True)
    return "started"


@pytest.mark.integration
def test_marked_starts_a_subprocess(server):
    subprocess.run(["true"], check=True)


def test_unmarked_uses_a_fixture_an_earlier_test_set_up(server):
    assert server == "started"


def test_unmarked_starts_a_subprocess():
    subprocess.run(["true"], check=True)


def test_unmarked_starts_a_multiprocessing_worker():
    worker = multiprocessing.get_context("spawn").Process(target=print)
    worker.start()
    worker.join()


def test_unmarked_pure():
    assert sum(range(4)) == 6
'''


def test_only_tests_marked_integration_may_start_processes(pytester):
    pytester.makeini("[pytest]\nmarkers =\n    integration: starts processes\n")
    pytester.makepyfile(test_inner=INNER)
    run = pytester.inline_run("-p", "no:cacheprovider", plugins=[IntegrationGuard()])
    passed, _, failed = run.listoutcomes()
    assert sorted(r.nodeid.split("::")[1] for r in passed) == ["test_marked_starts_a_subprocess", "test_unmarked_pure"]
    reasons = {r.nodeid.split("::")[1]: str(r.longrepr) for r in failed}
    assert sorted(reasons) == ["test_unmarked_starts_a_multiprocessing_worker", "test_unmarked_starts_a_subprocess",
                               "test_unmarked_uses_a_fixture_an_earlier_test_set_up"]
    for reason in reasons.values():
        assert "Expected a test that is not marked integration to start no process" in reason
        assert "Mark the test @pytest.mark.integration" in reason
    assert "true (in the test)" in reasons["test_unmarked_starts_a_subprocess"]
    assert "SpawnProcess(" in reasons["test_unmarked_starts_a_multiprocessing_worker"]
    assert "true (in fixture 'server')" in reasons["test_unmarked_uses_a_fixture_an_earlier_test_set_up"]


def test_the_same_tests_all_pass_without_the_guard(pytester):
    """The failures above are the guard's: without it every inner test passes."""
    pytester.makeini("[pytest]\nmarkers =\n    integration: starts processes\n")
    pytester.makepyfile(test_inner=INNER)
    pytester.inline_run("-p", "no:cacheprovider").assertoutcome(passed=5)
