"""The project's shape, enforced: the core's layer order, no import circle anywhere, no GUI
toolkit in the core, a light reader, small plugin files, and one plugin manifest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("casam_core", "napari_casam", "training")

# casam_core's layers, lowest first: a module imports only from its own layer or below
# (docs/architecture.md). The package __init__ is a lazy facade and sits above all.
CORE_LAYERS = (
    ("errors", "files", "config", "progress", "metrics", "samples", "distributed", "_ov_check"),
    ("io", "images", "datasets", "task_data", "dicom_seg", "cache", "overlay", "prompts", "clicks", "decoder_graphs",
     "alignment", "router", "finder", "runtimes", "backbones"),
    ("tasks", "auto"),
    ("predictor",),
    ("task_files", "library", "evaluate", "losses", "learn_structures", "training", "segment", "batch", "demo"),
    ("build",),
    ("cli",),
)
LEVEL = {f"casam_core.{m}": level for level, names in enumerate(CORE_LAYERS) for m in names}
FRONT_ENDS = len(CORE_LAYERS)  # napari_casam and training/ stand on the whole core


def _modules():
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for package in PACKAGES for p in (REPO / package).glob("*.py")}


def _imports(module: str, path: Path, known) -> set:
    """Project modules that ``module`` imports anywhere in its file (at import time, in functions,
    under TYPE_CHECKING), including the lazy names of a package __init__."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and path.name == "__init__.py":
            found.add(f"{'.'.join(package)}.{node.value}")  # importlib.import_module(f".{name}")
    return {m for m in found if m in known and m != module}


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_core_module_has_a_layer():
    core = {m for m in _modules() if m.startswith("casam_core.") and not m.endswith("__init__")}
    assert core == set(LEVEL), f"not placed in CORE_LAYERS: {core - set(LEVEL)}; gone: {set(LEVEL) - core}"


def test_imports_follow_the_layer_order():
    wrong = []
    for module, targets in _graph().items():
        if module.endswith("__init__"):
            continue
        level = LEVEL.get(module, FRONT_ENDS)
        for target in targets:
            if target.endswith("__init__"):
                continue
            if not target.startswith("casam_core.") and module.startswith("casam_core."):
                wrong.append(f"{module} imports the front end {target}")
            elif LEVEL.get(target, FRONT_ENDS) > level:
                wrong.append(f"{module} (layer {level}) imports {target} (layer {LEVEL.get(target, FRONT_ENDS)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = _graph()
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_import_reader_sees_lazy_imports(tmp_path):
    """An upward import inside a function is seen (so the checks above pass for a reason)."""
    path = tmp_path / "planted.py"
    path.write_text("from .cli import main\n\ndef f():\n    from . import predictor\n", encoding="utf-8")
    assert _imports("casam_core.errors", path, set(_modules())) == {"casam_core.cli", "casam_core.predictor"}


def test_core_imports_no_gui_toolkit():
    banned = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")
    for path in (REPO / "casam_core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_the_model_session_has_no_qt():
    """The plugin's model session is testable without a viewer: no GUI toolkit in its imports."""
    code = ("import sys, napari_casam._session, napari_casam._layers, napari_casam._workers; "
            "print(sorted(m for m in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_reader_does_not_import_torch():
    code = ("import sys, napari_casam._reader, napari_casam._sample_data, casam_core; "
            "print('torch' in sys.modules, 'segment_anything' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_plugin_files_stay_small():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (REPO / "napari_casam").glob("*.py")}
    assert max(sizes.values()) <= 400, sizes


def test_the_top_level_manifest_is_the_package_one():
    """napari.yaml at the top (the design card) is a link to the manifest npe2 reads from the package."""
    pytest.importorskip("npe2")
    from npe2 import PluginManifest

    top = REPO / "napari.yaml"
    assert top.is_symlink() and top.resolve() == (REPO / "napari_casam" / "napari.yaml").resolve()
    installed = PluginManifest.from_distribution("napari-casam")
    assert PluginManifest.from_file(top).model_dump() == installed.model_dump()


def test_no_private_name_is_imported_across_packages():
    """``from casam_core.x import _name`` in the plugin, the benchmark or the scripts: a private name
    is the module's own business; what another package needs is public."""
    wrong = []
    for package in PACKAGES + ("benchmarks",):
        for path in (REPO / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    home = node.module.split(".")[0]
                    if home in PACKAGES and home != package:
                        wrong += [f"{package}/{path.name}: {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_") and not a.name.startswith("__")]
                        if any(part.startswith("_") for part in node.module.split(".")[1:]) and package != "napari_casam":
                            wrong.append(f"{package}/{path.name}: the private module {node.module}")
    assert not wrong, "\n".join(wrong)


def test_core_files_stay_under_600_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (REPO / "casam_core").glob("*.py")}
    assert max(sizes.values()) <= 600, {k: v for k, v in sizes.items() if v > 600}
