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
    assert {"configs/", "data/", "docs/", "scripts/", "tests/", "train.py"} <= set(names)


def test_docs_layout_lists_every_module():
    names = set(listed((ROOT / "docs" / "layout.md").read_text()))
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dpq_lightning").rglob("*.py")
                     if p.name != "__init__.py")
    assert [m for m in modules if m not in names] == []
    assert sorted(n for n in names if not (ROOT / n.rstrip("/")).exists()) == []
