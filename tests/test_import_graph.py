"""The import-graph helper (tests/import_graph.py) on small made-up packages."""

from __future__ import annotations

from pathlib import Path

from import_graph import collapse, cycles, import_graph


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_relative_and_nested_imports_resolve(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "", "a.py": "def f():\n    pass\n",
        "c.py": "from . import a\nimport pkg.sub.d\n",
        "sub/__init__.py": "", "sub/d.py": "from ..a import f\n",
    })
    g = import_graph(pkg, "pkg")
    assert g["pkg.c"] == {"pkg.a", "pkg.sub.d"} and g["pkg.sub.d"] == {"pkg.a"}
    assert cycles(g) == []


def test_collapse_finds_cycles_between_subpackages(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "x/__init__.py": "", "x/one.py": "from pkg.y.two import t\n", "x/three.py": "",
        "y/__init__.py": "", "y/two.py": "t = 1\n", "y/four.py": "from pkg.x.three import *\n",
    })
    g = import_graph(pkg, "pkg")
    assert cycles(g) == []  # no cycle between modules ...
    assert cycles(collapse(g, 2)) == [["pkg.x", "pkg.y"]]  # ... but between packages
