"""The stages import one way: fewstep (the shared leaf) <- distill <- export <- runtime <- verify, demo, benchmarks.
Every import statement of every module is read (those inside functions too), so a lazy back-arrow fails as well."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"fewstep", "distill", "export", "runtime", "verify", "demo", "benchmarks"}
# What each package may not import (the project's packages, and torch for the torch-free ones)
FORBIDDEN = {
    "fewstep": PROJECT - {"fewstep"} | {"torch", "numpy"},
    "distill": {"export", "runtime", "verify", "demo", "benchmarks"},
    "export": {"runtime", "verify", "demo", "benchmarks"},
    "runtime": {"torch", "distill", "export", "verify", "demo", "benchmarks"},
    # above both stages, by design: verify (the PyTorch reference behind the runtime's loop), demo, benchmarks
    "verify": {"demo", "benchmarks"},
    "demo": {"benchmarks"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file (relative imports stay inside its package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_later_stage(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[package]) for f in files}
    assert not {f: names for f, names in bad.items() if names}


def test_the_check_sees_lazy_imports(tmp_path):
    """A function-level import counts (the way back-arrows used to hide)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from distill.bundle import load_bundle\n    import torch.nn as nn\n")
    assert imported_packages(module) == {"distill", "torch"}


def test_benchmarks_are_not_installed():
    """Research and benchmark scripts stay outside the installed packages (pyproject's package list)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("benchmarks") for p in include)
    assert {p.rstrip("*") for p in include} == PROJECT - {"benchmarks"}
