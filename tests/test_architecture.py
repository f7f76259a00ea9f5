"""The layering of DESIGN.md, checked from the code's own imports (those inside functions too).

Lowest layer first: errors → hashing / registry / plan (shared utilities and the one plan type)
→ storage, quant → spec → workload → runtime → sensitivity → search → export → service → cli. A part imports only parts of lower
layers (two parts of one layer, such as storage and quant, do not import each other), and the
trial log (``mpsearch/storage/trials.py``) is the only module that touches Optuna's private
parts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mpsearch"

LAYERS = [
    {"errors"},
    {"hashing", "registry", "plan", "memory"},
    {"storage", "quant"},
    {"spec"},
    {"workload"},
    {"runtime"},
    {"sensitivity"},
    {"search"},
    {"export", "report"},
    {"service"},
    {"cli"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}
TRIAL_LOG = "storage/trials.py"

# Optuna's private parts: attributes of its objects, and its private modules.
OPTUNA_PRIVATE = re.compile(r"\._(storage|study_id|trial_id|thread_local|get_trials|backend|cached_frozen_trial|relative_params)\b|optuna(\.\w+)*\._\w+")


def part_of(path: Path, root: Path) -> str | None:
    """The part a module belongs to: its subpackage, or its own name for a top-level module."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] in ("__init__", "__main__"):
        return None  # the package's public face and entry point sit above every layer
    return parts[0]


def imported_parts(source: str, package: str = "mpsearch") -> set[tuple[str, str | None]]:
    """``(part, name)`` for every ``mpsearch.PART`` import in ``source``, at any depth of the code.

    >>> sorted(imported_parts("import mpsearch.quant.bank\\ndef f():\\n    from mpsearch.search import driver"))
    [('quant', None), ('search', None)]
    >>> sorted(imported_parts("from mpsearch import __version__"))
    [('', '__version__')]
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in modules:
            if module == package:
                found.add(("", name))
            elif module.startswith(package + "."):
                found.add((module.split(".")[1], None))
    return found


def violations(root: Path) -> list[str]:
    """Every import that breaks the layering, and every import cycle between parts."""
    problems, edges = [], {}
    for path in sorted(root.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        part = part_of(path, root)
        if part is None:
            continue
        if part not in LEVEL:
            problems.append(f"{path.relative_to(root)}: part {part!r} has no layer; add it to LAYERS and DESIGN.md")
            continue
        for target, name in imported_parts(path.read_text()):
            if target == "":
                if name != "__version__":
                    problems.append(f"{path.relative_to(root)} imports {name!r} from the package's public face; import it from its own part")
                continue
            if target == part:
                continue
            edges.setdefault(part, set()).add(target)
            if target not in LEVEL:
                continue
            if LEVEL[target] >= LEVEL[part]:
                problems.append(f"{path.relative_to(root)}: {part} (layer {LEVEL[part]}) imports {target} (layer {LEVEL[target]})")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of parts, found by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt) :] + [nxt]
                if frozenset(cycle) not in done:
                    done.add(frozenset(cycle))
                    found.append(cycle)
            elif len(path) < len(LEVEL) + 1:
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    return found


def optuna_private_uses(root: Path) -> list[str]:
    """Lines outside the trial log (and this file, which names them) that touch Optuna's private attributes or modules."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == TRIAL_LOG or "migrations" in path.parts or path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OPTUNA_PRIVATE.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


def test_every_part_imports_only_lower_layers_and_no_parts_import_each_other():
    assert violations(PACKAGE) == []


def test_only_the_trial_log_touches_optunas_private_parts():
    assert optuna_private_uses(PACKAGE) == []
    assert optuna_private_uses(PACKAGE.parent / "tests") == []  # tests go through the trial log too
    assert OPTUNA_PRIVATE.search((PACKAGE / TRIAL_LOG).read_text())  # the log itself does (the check reads real code)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"quant/a.py": "from mpsearch.search.driver import Search\n"}, "quant (layer 2) imports search (layer 7)"),
        ({"quant/a.py": "def f():\n    import mpsearch.storage.trials\n"}, "quant (layer 2) imports storage (layer 2)"),
        ({"search/a.py": "from mpsearch.sensitivity import x\n", "sensitivity/b.py": "from mpsearch.search import y\n"}, "import cycle: search -> sensitivity -> search"),
        ({"gadgets/a.py": "x = 1\n"}, "part 'gadgets' has no layer"),
        ({"search/a.py": "from mpsearch import Workload\n"}, "imports 'Workload' from the package's public face"),
    ],
)
def test_the_checks_find_what_they_look_for(tmp_path, files, expected):
    """The checks above could pass by looking at nothing: each kind of violation is caught here."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert any(expected in problem for problem in violations(tmp_path)), violations(tmp_path)


def test_the_optuna_check_finds_private_uses(tmp_path):
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "a.py").write_text("def f(study):\n    return study._storage\n")
    (tmp_path / "search" / "b.py").write_text("from optuna.storages._rdb import models\n")
    assert len(optuna_private_uses(tmp_path)) == 2
