"""The package layout: imports run only downwards along the data flow, and no module name shadows another.

Layers (litegpt/__init__.py): shared vocabulary < data, model < features < train, eval < demo, cli.
`data` and `model` never import each other, nor do `train` and `eval`; there is no import cycle.
Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
import importlib.machinery
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "litegpt"
SHARED = {"litegpt", "litegpt.labels", "litegpt.grammar", "litegpt.boxes", "litegpt.distributed", "litegpt.files"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> tuple[int, str]:
    """(level, group): a module may import lower levels and its own group."""
    if module in SHARED:
        return 0, "shared"
    top = module.split(".")[1]
    return {"data": (1, "data"), "model": (1, "model"), "features": (2, "features"), "train": (3, "train"),
            "eval": (3, "eval"), "demo": (4, "demo"), "cli": (4, "cli")}[top]


def imports_of(path: Path) -> set[str]:
    """Every litegpt module `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downwards(module):
    level, group = layer(module)
    for target in sorted(GRAPH[module]):
        if target == "litegpt" or target.startswith(module + "."):  # the package itself, a sub-package's modules
            continue
        t_level, t_group = layer(target)
        assert t_level < level or t_group == group, f"{module} (layer {group}) imports {target} (layer {t_group})"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH[node]:
            if nxt.startswith(node + "."):
                continue
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_no_module_shadows_another_top_level_module():
    """A script in litegpt/ (or a shell inside it) puts that folder first on sys.path: no module or
    sub-package there may share its name with the standard library or an installed package."""
    repo = PACKAGE.parent.resolve()
    path = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(repo)]
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    for name in sorted(names - {"__init__", "__pycache__", "configs"}):
        assert name not in sys.stdlib_module_names, f"litegpt has a module {name!r}, as the standard library"
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        assert spec is None, f"litegpt has a module {name!r}, as the installed {spec.origin}"


@pytest.mark.parametrize("cwd", ["", "litegpt", "litegpt/data", "litegpt/model", "litegpt/train", "litegpt/eval"])
def test_every_module_imports_from_inside_the_package(cwd):
    root = PACKAGE.parent
    code = "; ".join(f"import {m}" for m in sorted(MODULES))
    result = subprocess.run([sys.executable, "-c", code], cwd=root / cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_runs_as_a_script():
    result = subprocess.run([sys.executable, str(PACKAGE / "cli.py"), "synth", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--out" in result.stdout


def test_a_recipe_is_validated_before_torch_is_imported():
    """train.py refuses a bad recipe before importing torch (a second, not the ~10 s of torch + DeepSpeed)."""
    code = ("import sys; from litegpt.train.config import load_recipe; from litegpt.model.config import ConfigError\n"
            "try: load_recipe('configs/tiny/stage1.yaml', ['train.micro_batch=0'], 'ds_configs/zero2.json', 1)\n"
            "except ConfigError as exc: print('refused:', exc)\n"
            "print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert "refused:" in result.stdout and "micro_batch" in result.stdout, result.stdout + result.stderr
    assert "torch imported: False" in result.stdout


def string_constants(path: Path) -> list[str]:
    """The string literals of a module's code; docstrings are prose (they may give examples) and are left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_but_labels_names_a_vindr_label():
    """The vocabulary belongs to the data: only its owner, litegpt/labels.py, spells VinDr-CXR's labels
    (and the synthetic vocabularies, whose NIH-like names overlap VinDr's)."""
    from litegpt.labels import KAGGLE_CLASSES, VINDR_CXR

    vindr = set(VINDR_CXR.all_labels) | set(KAGGLE_CLASSES) | set(VINDR_CXR.aliases)
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(name)}(?!\w)" for name in sorted(vindr, key=len, reverse=True)))
    found = {}
    for name, path in MODULES.items():
        hits = sorted({m.group() for s in string_constants(path) for m in pattern.finditer(s)})
        if hits and name != "litegpt.labels":
            found[name] = hits
    assert not found, f"VinDr-CXR labels named outside litegpt/labels.py: {found}"
    assert pattern.search(" ".join(string_constants(MODULES["litegpt.labels"])))  # the scan does find them
