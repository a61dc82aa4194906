"""The import-graph helper (tests/import_graph.py) finds the cycles it should, and only those."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from import_graph import collapse, cycle_path, find_cycles, import_graph  # noqa: E402


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_finds_a_cycle_hidden_in_a_lazy_import(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from pkg import b\n\ndef f():\n    return b\n",
        "b.py": "def g():\n    from pkg.a import f  # lazy: still a cycle\n    return f\n",
        "c.py": "from . import a\nimport pkg.sub.d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import f\n",
    })
    g = import_graph(pkg, "pkg")
    assert g["pkg.a"] == {"pkg.b"} and g["pkg.b"] == {"pkg.a"}
    assert g["pkg.c"] == {"pkg.a", "pkg.sub.d"} and g["pkg.sub.d"] == {"pkg.a"}
    assert find_cycles(g) == [["pkg.a", "pkg.b"]]
    assert cycle_path(g, ["pkg.a", "pkg.b"]) == ["pkg.a", "pkg.b", "pkg.a"]


def test_type_checking_imports_and_one_way_imports_are_fine(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import g\n",
        "b.py": "import os\nfrom pkg import a\n",
    })
    g = import_graph(pkg, "pkg")
    assert g["pkg.a"] == set() and g["pkg.b"] == {"pkg.a"}
    assert find_cycles(g) == []


def test_collapse_finds_cycles_between_subpackages(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "x/__init__.py": "", "x/one.py": "from pkg.y.two import t\n", "x/three.py": "",
        "y/__init__.py": "", "y/two.py": "t = 1\n", "y/four.py": "from pkg.x.three import *\n",
    })
    g = import_graph(pkg, "pkg")
    assert find_cycles(g) == []  # no cycle between modules ...
    assert find_cycles(collapse(g, 2)) == [["pkg.x", "pkg.y"]]  # ... but between packages
