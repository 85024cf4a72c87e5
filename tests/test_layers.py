"""The layer rule of DESIGN.md: a module imports only from layers below it."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "nmt"
LAYERS = {
    "nmt": 0,
    "nmt.errors": -1,
    "nmt.config": 0,
    "nmt.metrics": 0,
    "nmt.devices": 0,
    "nmt.distributed": 0.5,
    "nmt.progress": 0,
    "nmt.textio": 0,
    "nmt.runlog": 0,
    "nmt.corpora": 1,
    "nmt.tokenizer": 1,
    "nmt.alignment": 1,
    "nmt.data": 2,
    "nmt.batching": 2,
    "nmt.models": 3,
    "nmt.models.base": 3,
    "nmt.models.attention": 3,
    "nmt.models.gnmt": 3,
    "nmt.models.tcn": 3,
    "nmt.models.ensemble": 3,
    "nmt.models.inference": 3,
    "nmt.models.shortlisted": 3,
    "nmt.shortlist": 5.5,
    "nmt.search": 4,
    "nmt.forced": 4,
    "nmt.search_graph": 4.5,
    "nmt.checkpoint": 5,
    "nmt.optimization": 5,
    "nmt.run_state": 5.5,
    "nmt.validation": 5.5,
    "nmt.training": 6,
    "nmt.translator": 6,
    "nmt.evaluation": 6.5,
    "nmt.plots": 6.5,
    "nmt.serve": 6.75,  # DESIGN.md's layer 7 (beside cli), below cli here: `nmt serve` calls it
    "nmt.cli": 7,
    "nmt.__main__": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nmt_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nmt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmt"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in LAYERS else node.module)
    return found


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_module_has_a_layer_and_imports_only_lower_layers(path):
    name = _module_name(path)
    assert name in LAYERS, f"{name} is not in the layer table of DESIGN.md / this test"
    for imported in _nmt_imports(path):
        same_package = imported.startswith(name + ".") or name.startswith("nmt.models")
        assert LAYERS[imported] < LAYERS[name] or (
            same_package and LAYERS[imported] == LAYERS[name]
        ), f"{name} (layer {LAYERS[name]}) imports {imported} (layer {LAYERS[imported]})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_module_imports(path):
    name = _module_name(path)
    if name != "nmt.__main__":
        importlib.import_module(name)


def test_config_does_not_import_torch():
    tree = ast.parse((ROOT / "config.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(str(n).startswith("torch") for n in names)


def test_files_are_written_under_their_final_name_in_one_place():
    """Every temporary-file-and-rename goes through nmt.textio.atomic_write; the one other rename
    is nmt.data's swap of a finished folder (a folder cannot be written atomically as a file)."""
    found = {}
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "recipes").rglob("*.py")]:
        text = path.read_text()
        for call in ("os.replace(", "os.rename(", ".rename(", "mkstemp("):
            if call in text:
                found.setdefault(path.relative_to(ROOT.parent).as_posix(), set()).add(call)
    assert found == {
        "nmt/textio.py": {"os.replace(", "mkstemp("},
        "nmt/data.py": {"os.replace("},
    }
