"""The layout lists in README.md (packages) and docs/layout.md (every module) match the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed(text: str) -> list[str]:
    """Paths named by an indented layout block (the first ``` block that starts with train.py):
    two spaces of indent per folder level; an entry is the first word of its line."""
    block = re.search(r"```\n(train\.py.*?)```", text, re.S).group(1)
    out, stack = [], []
    for line in block.splitlines():
        if not line.strip() or not re.match(r"\s*[\w.]", line):
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        if indent > len(stack):  # a continuation line of the entry above
            continue
        stack = stack[:indent]
        out.append("/".join([*stack, name]).rstrip("/") + ("/" if name.endswith("/") else ""))
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return out


def test_readme_lists_every_package_and_nothing_that_is_gone():
    names = listed((ROOT / "README.md").read_text())
    missing = [n for n in names if not (ROOT / n.rstrip("/")).exists()]
    assert missing == []
    packages = sorted(f"dpq_lightning/{p.name}/" for p in (ROOT / "dpq_lightning").iterdir()
                      if p.is_dir() and (p / "__init__.py").is_file())
    assert [p for p in packages if p not in names] == []
    assert {"configs/", "data/", "docs/", "scripts/", "studies/", "tests/", "train.py"} <= set(names)


def test_docs_layout_lists_every_module():
    names = set(listed((ROOT / "docs" / "layout.md").read_text()))
    modules = sorted(str(p.relative_to(ROOT)) for top in ("dpq_lightning", "studies/harness")
                     for p in (ROOT / top).rglob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if m not in names] == []
    assert sorted(n for n in names if not (ROOT / n.rstrip("/")).exists()) == []


# The rooms of the package from the bottom up: a module may import its own room and the rooms below
# it, never one above (docs/architecture.md). Loose root modules are rooms of their own.
LEVELS = [
    ("atomic", "torch_files", "distributed", "checkpoint_io", "diffusion"),  # small shared parts
    ("quant",),  # stage 1: pure tensor math
    ("models", "sampling"),
    ("data",),
    ("export", "calibration", "metrics"),
    ("evaluation",),
    ("callbacks", "validate"),
    ("config", "pretrain"),  # the run config: every section, from its owner
    ("jobs",),  # wiring
    ("cli",),
]


def package_imports(path: Path, package: Path) -> list[tuple[str, int]]:
    """(room imported, line) for every runtime import of the package inside ``path``, module-level
    or inside functions; ``if TYPE_CHECKING:`` blocks are not run and are skipped."""
    import ast

    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for n in ast.walk(node)}
    here = list(path.relative_to(package).parent.parts)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            target = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            if not node.module:
                target += [node.names[0].name]
        elif node.module and node.module.split(".")[0] == "dpq_lightning":
            target = node.module.split(".")[1:]
        else:
            continue
        if target:
            out.append((target[0], node.lineno))
    return out


def test_no_import_runs_back_up():
    package = ROOT / "dpq_lightning"
    level = {room: i for i, rooms in enumerate(LEVELS) for room in rooms}
    rooms = {p.stem if p.is_file() else p.name for p in package.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert sorted(rooms - set(level)) == []  # every room has its level: a new one is placed on purpose
    upward = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        room = rel.parts[0].removesuffix(".py")
        for target, line in package_imports(path, package):
            if target != room and level[target] > level[room]:
                upward.append(f"{rel}:{line} ({room}) imports {target}")
    assert upward == []


def test_the_library_never_imports_the_studies():
    """studies/ is the lab notebook beside the library: it imports dpq_lightning, never the reverse,
    and the miniature's configs and results live there, not in configs/ or docs/."""
    import ast

    found = []
    for path in (ROOT / "dpq_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "studies"]
    assert found == []
    assert not (ROOT / "configs" / "mini").exists() and not (ROOT / "dpq_lightning" / "experiments").exists()
    assert sorted(p.name for p in (ROOT / "docs").glob("results-*")) == []
    assert (ROOT / "studies" / "configs" / "_miniature.yaml").is_file()
