"""Every ```python block of README.md and docs/*.md runs, so a snippet cannot go stale.

Pages are discovered automatically. A page's blocks run in order in one namespace that starts
from the docs' shared setup: the block of docs/index.md marked ``<!-- docs-test: setup -->``
(the zoo model, two images and their corrupted versions; the page shows it to readers as the
conventions every snippet assumes). A block preceded by ``<!-- docs-test: skip: REASON -->``
(for example one that downloads weights) is not run; a page whose blocks are all skipped is
reported as skipped with the reasons.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)(?::\s*(.*?))?\s*-->\s*$")


def blocks(path: Path) -> list[dict]:
    """The page's python blocks: source, first line number, and the marker just before."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        marker = MARK.search(before[-1]) if before else None
        out.append({"code": m.group(2), "line": text[: m.start()].count("\n") + 2,
                    "mark": marker.group(1) if marker else None,
                    "reason": (marker.group(2) or "") if marker else ""})
    return out


def _setup_block() -> dict:
    found = [b for b in blocks(ROOT / "docs" / "index.md") if b["mark"] == "setup"]
    assert len(found) == 1, "docs/index.md needs exactly one block marked docs-test: setup"
    return found[0]


@pytest.fixture(scope="module")
def setup_namespace():
    ns: dict = {"__name__": "__docs__"}
    block = _setup_block()
    exec(compile(block["code"], f"docs/index.md:{block['line']}", "exec"), ns)
    return ns


@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_page_code_runs(path, setup_namespace, tmp_path, monkeypatch):
    found = blocks(path)
    if not found:
        pytest.skip("no python blocks")
    runnable = [b for b in found if b["mark"] not in ("skip", "setup")]
    if not runnable:
        pytest.skip("; ".join(sorted({b["reason"] or "marked skip" for b in found})))
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    # a snippet feeding raw [0, 1] images to the model is a docs bug
    warnings.filterwarnings("error", message=r"The images are all in \[0, 1\]")
    ns = dict(setup_namespace)
    for b in runnable:
        rel = path.relative_to(ROOT)
        try:
            exec(compile(b["code"], f"{rel}:{b['line']}", "exec"), ns)
        except Exception as e:  # name the block, keep the traceback
            raise AssertionError(f"{rel}, block at line {b['line']} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_markers_are_known():
    """A typo in a marker would silently run (or skip) a block."""
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"<!--\s*docs-test:\s*(\w+)", text):
            assert m.group(1) in ("skip", "setup"), f"{path.name}: unknown marker {m.group(1)}"
        for b in blocks(path):
            if b["mark"] == "skip":
                assert b["reason"], f"{path.name}:{b['line']}: a skip needs a reason"
