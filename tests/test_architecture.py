"""The architecture's rules, checked on the source: one-way imports, hooks installed only by the
model and the engine."""

from __future__ import annotations

import ast
from pathlib import Path

from import_graph import collapse, cycles, import_graph

PKG = Path(__file__).resolve().parent.parent / "patchlens"
HOOK_CALLS = {"run_with_hooks", "add_hook", "hooks", "register_forward_hook",
              "register_forward_pre_hook", "register_full_backward_hook", "register_hook",
              "register_backward_hook", "add_perma_hook"}
HOOK_OWNERS = ("patchlens/model/", "patchlens/patching/")


def test_no_import_cycles():
    found = cycles(import_graph(PKG, "patchlens"))
    assert not found, f"import cycles (every import counts, also inside functions): {found}"


def test_no_cycles_between_subpackages():
    """The layers point one way: e.g. recipes may use attribution or the reverse, not both."""
    found = cycles(collapse(import_graph(PKG, "patchlens"), 2))
    assert not found, f"cycles between subpackages: {found}"


def _hook_calls(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in HOOK_CALLS:
            out.append(f"{path.relative_to(PKG.parent)}:{node.lineno} .{node.func.attr}(")
    return out


def test_hooks_are_installed_only_by_the_model_and_the_engine():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).as_posix()
        if not rel.startswith(HOOK_OWNERS):
            offenders += _hook_calls(path)
    assert not offenders, ("hooks installed outside patchlens/model and patchlens/patching (ask "
                           f"the engine: run_variants / capture / capture_grads): {offenders}")


def test_the_check_sees_a_hook_call(tmp_path):
    """The checker itself: it finds the calls it is meant to find."""
    f = tmp_path / "m.py"
    f.write_text("def f(model):\n    with model.hooks(fwd_hooks=[]):\n        pass\n"
                 "    model.run_with_hooks(1)\n")
    global PKG
    old, PKG = PKG, tmp_path
    try:
        assert len(_hook_calls(f)) == 2
    finally:
        PKG = old


def test_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p import b\n")
    (pkg / "b.py").write_text("from p.a import f\n")
    assert cycles(import_graph(pkg, "p")) == [["p.a", "p.b"]]
