"""What a user installs: every package the code imports is declared in pyproject.toml, the license is stated and
shipped, and the packages say they are typed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "kvstore", "extract", "distill", "analysis", "pipelines")


def declared(project: dict) -> dict[str, str]:
    """Normalised distribution name → where it is declared (``dependencies`` or an extra)."""
    out = {}
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    for group, requirements in groups.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            out[re.sub(r"[-_.]+", "-", name).lower()] = group
    return out


def runtime_imports(tree: ast.AST) -> list[str]:
    """The modules ``tree`` imports at run time (not those under ``if TYPE_CHECKING:``)."""
    names: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            names += [n for child in node.orelse for n in runtime_imports(ast.Module([child], []))]
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        names += runtime_imports(node)
    return names


def imported_modules() -> dict[str, str]:
    """Top-level module → one file that imports it at run time, over every source file of the packages."""
    out: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in runtime_imports(ast.parse(path.read_text(), str(path))):
                out.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return out


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = declared(project)
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules().items():
        if module in sys.stdlib_module_names or module in ("kava", "__future__"):
            continue
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [module])}
        if not dists & set(wanted):
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_license_and_typing_ship_with_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    data = project["tool"]["setuptools"]["package-data"]
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in data[f"kava.{package}"], package
