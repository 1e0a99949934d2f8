"""The package surface: imports point down the layers, and every path the docs name imports.

Layers, top to bottom (DESIGN.md, "Layers"); a module may import its own group and any
group listed below its own, never one above it or beside it (``|``: the same rank):

    cli          polyak.cli, polyak.__main__
    rl           polyak.rl.*                    (only public names of what is below)
    api          polyak (the package root: re-exports the public names)
    averaging    polyak.averaging.*, polyak.schedules
    | optim      polyak.optim.*
    | grad       polyak.grad.*, polyak.transforms
    step         polyak.step (GlobalStep, read by averaging and grad alike)
    flat         polyak.flat
    helpers      polyak._checks, polyak._atomic, polyak._torch_compat

A private module (``pkg._name``) is public within its package only; the helpers at the
bottom serve every layer. Private names (``_name``) are never imported across modules.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest

import polyak

SRC = Path(polyak.__file__).resolve().parent
ROOT = SRC.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RANKS: list[dict[str, tuple[str, ...]]] = [
    {"cli": ("polyak.cli", "polyak.__main__")},
    {"rl": ("polyak.rl",)},
    {"api": ("polyak",)},
    {
        "averaging": ("polyak.averaging", "polyak.schedules"),
        "optim": ("polyak.optim",),
        "grad": ("polyak.grad", "polyak.transforms"),
    },
    {"step": ("polyak.step",)},
    {"flat": ("polyak.flat",)},
    {"helpers": ("polyak._checks", "polyak._atomic", "polyak._torch_compat")},
]
HELPERS = RANKS[-1]["helpers"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _group(module: str) -> tuple[int, str]:
    """(rank, group) of ``module``: the group with the longest prefix that covers it."""
    best: tuple[int, int, str] | None = None
    for rank, groups in enumerate(RANKS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                inside = prefix != "polyak" and module.startswith(prefix + ".")
                covers = module == prefix or inside
                if covers and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), rank, group)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to RANKS in {__file__}")
    return best[1], best[2]


def _imports(module: str, source: str | None = None) -> list[tuple[int, str, list[str]]]:
    """``(line, imported polyak module, names taken from it)`` for every import in ``module``
    (function-level ones included); ``from pkg import sub`` counts as importing ``pkg.sub``."""
    path = MODULES.get(module, SRC / "__probe__.py")
    tree = ast.parse(path.read_text() if source is None else source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "polyak"]
            out += [(node.lineno, name, []) for name in names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base]).strip(".")
            if base.split(".")[0] != "polyak":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    out.append((node.lineno, sub, []))
                else:
                    out.append((node.lineno, base, [alias.name]))
    return out


def _is_private_module(module: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in module.split("."))


def _problems(module: str, source: str | None = None) -> list[str]:
    """What is wrong with the imports of ``module`` (its file, or ``source``)."""
    rank, group = _group(module)
    out = []
    for line, target, names in _imports(module, source):
        where = f"{module}:{line}"
        if target not in MODULES:
            out.append(f"{where}: imports {target}, which does not exist")
            continue
        t_rank, t_group = _group(target)
        if t_group != group and t_rank <= rank:
            side = "beside" if t_rank == rank else "above"
            out.append(
                f"{where} ({group}) imports {target} ({t_group}), which is {side} it; imports "
                "only point down"
            )
        if _is_private_module(target) and target not in HELPERS:
            owner = target.rpartition(".")[0]
            if not (module == owner or module.startswith(owner + ".")):
                out.append(
                    f"{where}: {target} is private to {owner}; make what {module} needs "
                    "public within a package both belong to"
                )
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private:
            out.append(
                f"{where}: imports the private name(s) {private} from {target}; give them a "
                "public name in a module both can import"
            )
        below_rl = group == "rl" and t_group != "rl"
        if below_rl and _is_private_module(target) and target not in HELPERS:
            out.append(f"{where}: polyak.rl uses only the public API below it, not {target}")
    return out


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _group(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    assert _problems(module) == []


def test_averaging_does_not_reach_the_gradients_package():
    """An average reads the step counter; it does not need the optimizer machinery."""
    for module in MODULES:
        if _group(module)[1] == "averaging":
            reached = {_group(t)[1] for _, t, _ in _imports(module) if t in MODULES}
            assert not reached & {"grad", "optim"}, module


@pytest.mark.parametrize(
    ("module", "source", "flagged"),
    [
        ("polyak.averaging.ema", "from polyak.grad.optimizer import Optimizer", "beside"),
        ("polyak.averaging.ema", "from polyak import GlobalStep", "above"),
        ("polyak.flat", "import polyak.step", "above"),
        ("polyak.optim.adam", "def f():\n    from polyak.rl import loop", "above"),
        ("polyak.grad.transforms", "from polyak.grad.clipping import _cast", "private name"),
        ("polyak.optim._base", "from polyak.grad import _buffers", "private to polyak.grad"),
        ("polyak.rl.dqn", "from polyak.grad._buffers import flat_copy", "public API"),
        ("polyak.averaging.ema", "from polyak.step import GlobalStep", None),
        ("polyak.averaging.multi", "from . import names", None),
        ("polyak.grad.transforms", "from polyak.grad._buffers import RunCache", None),
        ("polyak.rl.checkpoint", "from polyak._atomic import save_atomic", None),
        ("polyak.rl.dqn", "import polyak", None),
    ],
)
def test_the_checker_flags_what_it_should(module, source, flagged):
    """The rules are not vacuous: each kind of bad import is reported, good ones are not."""
    problems = _problems(module, source)
    if flagged is None:
        assert problems == []
    else:
        assert any(flagged in p for p in problems), problems


# ----------------------------------------------------------------------------- documented paths

# Paths DESIGN.md names explicitly, beside those found in README.md and docs/*.md.
DESIGN_PATHS = ["polyak.transforms", "polyak.schedules", "polyak.optim", "polyak.gradients"]


def _documented_paths() -> list[str]:
    found = set(DESIGN_PATHS)
    for doc in DOCS:
        found.update(re.findall(r"\bpolyak(?:\.[A-Za-z_]\w*)+", doc.read_text()))
    return sorted(found)


def _documented_files() -> list[str]:
    found: set[str] = set()
    for doc in DOCS:
        found.update(re.findall(r"\bpolyak/[\w/]+\.py\b", doc.read_text()))
    return sorted(found)


@pytest.mark.parametrize("dotted", _documented_paths())
def test_documented_path_imports(dotted):
    """``polyak.a.b.c`` resolves attribute by attribute, and every prefix that is a module
    imports under that name (``import polyak.transforms`` works, not only
    ``polyak.transforms`` as an attribute)."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    path = parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        if isinstance(obj, ModuleType) and not hasattr(obj, part):
            importlib.import_module(path)  # a submodule its package does not import
        assert hasattr(obj, part), f"{dotted}: {path} does not exist"
        obj = getattr(obj, part)
        if isinstance(obj, ModuleType):
            assert importlib.import_module(path) is obj, f"import {path} gives another module"


@pytest.mark.parametrize("relpath", _documented_files())
def test_documented_file_exists(relpath):
    assert (SRC.parent / relpath).is_file(), f"the docs name {relpath}, which does not exist"


def test_the_public_paths_name_the_same_objects():
    """``polyak.transforms`` and ``polyak.schedules`` are the implementation modules' names,
    not copies of them."""
    import polyak.averaging.schedules
    import polyak.grad.transforms

    for public, impl in [
        (polyak.transforms, polyak.grad.transforms),
        (polyak.schedules, polyak.averaging.schedules),
    ]:
        assert public.__all__ == impl.__all__
        for name in impl.__all__:
            assert getattr(public, name) is getattr(impl, name), name
    assert callable(polyak.gradients) and not isinstance(polyak.gradients, ModuleType)


def _private_torch_uses(source: str) -> list[str]:
    """``torch....._name`` attributes and ``from torch... import _name`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__"):
                continue
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id == "torch":
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            private = [a.name for a in node.names if a.name.startswith("_")]
            private += [p for p in (node.module or "").split(".") if p.startswith("_")]
            found += [f"line {node.lineno}: {name}" for name in private]
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "polyak._torch_compat"))
def test_private_torch_names_only_in_torch_compat(module):
    """Every private torch name goes through polyak._torch_compat, where each has a tested
    public fallback (issue 10): a torch release that renames one breaks one module, not many."""
    assert _private_torch_uses(MODULES[module].read_text()) == []


def test_the_private_torch_check_flags_what_it_should():
    source = (
        "import torch\nfrom torch.optim.optimizer import _default\nfrom torch._C import x\n"
        "torch._foreach_add_(a, b)\ntorch.autograd._profiler_enabled()\ntorch.__version__\n"
    )
    assert [u.split(":")[0] for u in _private_torch_uses(source)] == [
        "line 2", "line 3", "line 4", "line 5"
    ]
