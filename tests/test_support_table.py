"""The support table in docs/loading.md is what tools/support_table.py renders from the committed
rows (docs/support_table.json), and a sample of those rows still holds for the current code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("support_table", ROOT / "tools" / "support_table.py")
support_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support_table)

ROWS = json.loads(support_table.JSON_PATH.read_text())
BY_NAME = {(r["library"], r["name"]): r for r in ROWS}
SAMPLE = [
    ("timm", "vit_small_patch16_dinov3"),
    ("timm", "vit_pe_core_tiny_patch16_384"),
    ("timm", "vit_small_patch16_rope_mixed_224"),
    ("timm", "vit_relpos_small_patch16_224"),
    ("timm", "deit_tiny_distilled_patch16_224"),
    ("transformers", "dinov3_vit"),
    ("transformers", "swin"),
    ("open_clip", "EVA02-B-16"),
    ("open_clip", "coca_ViT-B-32"),
    ("open_clip", "RN50"),
]


def test_the_docs_table_is_rendered_from_the_committed_rows():
    doc = support_table.DOC_PATH.read_text()
    block = doc.split(support_table.START, 1)[1].split(support_table.END, 1)[0]
    assert block.strip() == support_table.render(ROWS).strip()
    assert not [r for r in ROWS if r["status"] in ("mismatch", "error")]


@pytest.mark.parametrize("library, name", SAMPLE)
def test_a_sample_of_rows_still_holds(library, name):
    committed = BY_NAME[(library, name)]
    fresh = support_table.check(library, name)
    for key in ("family", "status", "reason"):
        assert fresh[key] == committed[key], (key, fresh[key], committed[key])
