"""Dependencies flow one way: the training scripts, the auto-labeller, the Space and the benchmarks import the model
and the data modules, never the reverse (the model files also travel to the Hub alone, as remote code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "hms_segmentation"
APPLICATIONS = {"cli.py", "autolabel.py"}
"""Top-level modules that are entry points (like `training/`), free to import the training stack."""
FORBIDDEN = ("training", "space", "benchmarks")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, as written (relative imports keep their leading dots), at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def _reaches(name: str, forbidden: str) -> bool:
    parts = name.lstrip(".").split(".")
    absolute = name.startswith("hms_segmentation.") or name == "hms_segmentation"
    return (parts[1:2] if absolute else parts[:1]) == [forbidden] or name.split(".")[0] == forbidden


MODEL_AND_DATA_MODULES = sorted(
    [path for path in PACKAGE.glob("*.py") if path.name not in APPLICATIONS] + sorted((PACKAGE / "data").glob("*.py")),
    key=lambda path: str(path),
)


@pytest.mark.parametrize("path", MODEL_AND_DATA_MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_model_and_data_modules_never_import_the_training_stack(path):
    offending = sorted(name for name in imported_modules(path) for forbidden in FORBIDDEN if _reaches(name, forbidden)
                       and not (path.parent.name == "data" and name == ".training"))  # data/training.py: a sibling
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}"


def test_the_check_sees_a_reverse_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from .training.evaluate import markdown_table\n")
    assert any(_reaches(name, "training") for name in imported_modules(module))
    module.write_text("from hms_segmentation.training import train\n")
    assert any(_reaches(name, "training") for name in imported_modules(module))
