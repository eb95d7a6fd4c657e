"""The CKA inspection notebook, executed end to end in a real kernel against a real store and a real `kava distill` run.

The store is stories260K over 12 synthetic problems with calibration CKA matrices stored; the run is 3 steps of the
tiny-qwen2 preset on it. The kernel inherits ``os.environ``, so ``KAVA_STORE`` / ``KAVA_RUN`` reach it through
``monkeypatch``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import asset_path

from kava.distill.config import DistillConfig
from kava.distill.trainer import run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis" / "notebooks" / "cka_inspection.ipynb"

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def store_and_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("notebook")
    store, run = root / "kv.zarr", root / "run"
    run_extract(ExtractConfig.from_dict(dict(teacher=str(asset_path("models/stories260K_hf_derived")), store=str(store),
                                             limit=12, shard_tokens=1024, batch_size=8, progress=False,
                                             calibration_samples=4, with_q=False)),
                log=lambda _: None)
    run_distill(DistillConfig(out=str(run), store=str(store), student="tiny-qwen2", steps=3, batch_size=4,
                              progress=False, checkpoint_every=0, loss="mercator"), log=lambda _: None)
    return store, run


def execute(workdir: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> list[dict]:
    """Run every cell in a fresh python3 kernel (in ``workdir``); return the outputs of all cells, in order."""
    pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel: pip install -e '.[test]'")
    import nbformat
    from nbclient import NotebookClient

    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core warns about its old paths otherwise
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # the kernel shares the machine's cores with this process
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises fails the test here with its traceback (CellExecutionError).
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def images(outputs: list[dict]) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code)


@pytest.mark.integration
@pytest.mark.slow
def test_notebook_runs_end_to_end(store_and_run, tmp_path, monkeypatch):
    store, run = store_and_run
    outputs = execute(tmp_path, monkeypatch, {"KAVA_STORE": str(store), "KAVA_RUN": str(run), "KAVA_TEACHER": None})
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = text_of(outputs)
    assert '"tokens":' in text and "tokens per segment" in text
    assert "teacher_teacher_biased" in text and "largest difference to the stored calibration matrix" in text
    # Stored CKA, layer map, recomputed CKA, training curves.
    assert images(outputs) == 4


@pytest.mark.integration
@pytest.mark.slow
def test_notebook_skips_the_run_section_without_kava_run(store_and_run, tmp_path, monkeypatch):
    store, _ = store_and_run
    outputs = execute(tmp_path, monkeypatch, {"KAVA_STORE": str(store), "KAVA_RUN": None, "KAVA_TEACHER": None})
    assert "KAVA_RUN is unset" in text_of(outputs)
    assert images(outputs) == 3
