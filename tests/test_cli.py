"""The patchlens command: help texts, user errors as one line with exit code 2."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from patchlens.cli import BENCHMARKS, app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _png(path: Path, seed: int = 0, size: int = 64) -> str:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("img")
    return [_png(d / f"img{i}.png", i) for i in range(2)]


@pytest.mark.parametrize("cmd", ["demo", "caap", "patch", "hooks", "zoo", "bench", "run"])
def test_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def test_zoo_lists_models():
    res = runner.invoke(app, ["zoo"])
    assert res.exit_code == 0
    assert "clutter-digits-vit" in res.output and "clutter-digits-shortcut-vit" in res.output


def test_hooks_table():
    res = runner.invoke(app, ["hooks", "clutter-digits-vit"])
    assert res.exit_code == 0
    assert "blocks.0.attn.hook_pattern" in res.output


def _one_error_line(res, after_progress: bool = False):
    """The single ``error:`` line of a failed command (``after_progress``: progress bars of a
    computation that ran first may precede it)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    if after_progress:
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], res.output
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_unknown_model():
    line = _one_error_line(runner.invoke(app, ["hooks", "no-such-model-xyz"]))
    assert "no-such-model-xyz" in line


def test_missing_file(tmp_path):
    line = _one_error_line(runner.invoke(app, ["caap", str(tmp_path / "missing.png")]))
    assert "missing.png" in line
    line = _one_error_line(runner.invoke(app, ["patch", str(tmp_path / "a.png"), str(tmp_path / "b.png")]))
    assert "a.png" in line


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not an image")
    line = _one_error_line(runner.invoke(app, ["caap", str(bad), "--out", str(tmp_path / "r.html")]))
    assert "bad.png" in line


def test_bad_layers(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(img)
    line = _one_error_line(runner.invoke(app, ["caap", str(img), "--layers", "x:y", "--out",
                                               str(tmp_path / "r.html")]))
    assert "--layers" in line


def test_caap_and_patch_write_reports(tmp_path, pngs):
    c = tmp_path / "c.html"
    res = runner.invoke(app, ["caap", pngs[0], "--layers", "2:6", "--out", str(c)])
    assert res.exit_code == 0, res.output
    assert c.stat().st_size > 1_000_000  # plotly.js inlined: opens offline
    assert "AttributionMap(" not in res.output  # a summary, not a repr
    assert re.search(r"CAAP maps of 1 image\(s\), patch grid 8x8 \(layers \(2, 6\)", res.output)
    assert re.search(r"img0.png  class \d: map from -?[\d.e-]+ to -?[\d.e-]+, top patch row \d, "
                     r"col \d", res.output)
    res = runner.invoke(app, ["patch", *pngs, "--per", "layer", "--out", str(tmp_path / "p.html")])
    assert res.exit_code == 0, res.output
    assert "PatchResult" in res.output


def test_caap_never_overwrites_without_force(tmp_path, pngs):
    c = tmp_path / "c.html"
    c.write_text("mine")
    line = _one_error_line(runner.invoke(app, ["caap", pngs[0], "--out", str(c)]))
    assert "exists" in line and "--force" in line and c.read_text() == "mine"
    res = runner.invoke(app, ["caap", pngs[0], "--out", str(c), "--force", "--plotlyjs", "cdn"])
    assert res.exit_code == 0, res.output
    html = c.read_text()
    assert c.stat().st_size < 200_000 and "https://cdn.plot.ly/plotly-" in html
    assert "integrity='sha384-" in html and "Plotly.newPlot" in html


def test_patch_per_head_switches_to_z(pngs):
    res = runner.invoke(app, ["patch", *pngs, "--per", "head"])
    assert res.exit_code == 0, res.output
    assert "layer(6) x head(4)" in res.output and "site=z" in res.output


def test_patch_unknown_site_points_to_hooks(pngs):
    line = _one_error_line(runner.invoke(app, ["patch", *pngs, "--site", "foo"]), after_progress=True)
    assert "'foo'" in line and "patchlens hooks clutter-digits-vit" in line


def test_hooks_names_in_full_and_opt_in_said():
    from patchlens import HookedViT

    res = runner.invoke(app, ["hooks"], terminal_width=60)
    assert res.exit_code == 0, res.output
    for name in HookedViT.from_pretrained("clutter-digits-vit").hook_dict:
        assert re.search(rf"\s{re.escape(name)}\s", res.output), name
    assert "…" not in res.output
    assert "opt-in hooks switched on" in " ".join(res.output.split())


def _commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def test_help_text_is_not_hard_wrapped():
    """Help strings have no line breaks (rich wraps them); at 80 columns nothing is cut off and
    no rich emoji code swallowed text."""
    for name, cmd in _commands().items():
        texts = [cmd.help or "", cmd.short_help or ""] + [p.help or "" for p in cmd.params
                                                           if hasattr(p, "help")]
        assert all("\n" not in t for t in texts), name
        out = runner.invoke(app, [name, "--help"], terminal_width=80).output
        assert "…" not in out, (name, out)
        assert all(ord(ch) < 128 or 0x2500 <= ord(ch) <= 0x257F for ch in out), (name, out)
    out = runner.invoke(app, ["--help"], terminal_width=80).output
    for name in _commands():
        assert re.search(rf"│ {name}\s+\S", out), name


def test_docs_cli_documents_every_option():
    """docs/cli.md has a section per command naming each of its options."""
    doc = (ROOT / "docs" / "cli.md").read_text()
    sections = {part.split("`", 1)[0]: part for part in doc.split("\n## `patchlens ")[1:]}
    for name, cmd in _commands().items():
        assert name in sections, f"docs/cli.md has no section for patchlens {name}"
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in sections[name], f"docs/cli.md: {name} {opt}"


# ---- user errors: one `error:` line, exit code 2 ------------------------------------------------
def test_demo_n_zero():
    line = _one_error_line(runner.invoke(app, ["demo", "--n", "0"]))
    assert "--n must be at least 1" in line


def test_out_under_a_regular_file(tmp_path, pngs):
    (tmp_path / "file").write_text("x")
    for cmd in (["demo"], ["caap", pngs[0]], ["patch", *pngs]):
        line = _one_error_line(runner.invoke(app, [*cmd, "--out", str(tmp_path / "file" / "r.html")]))
        assert "is a file, not a directory" in line, cmd


def test_out_unwritable(tmp_path, pngs, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    line = _one_error_line(runner.invoke(app, ["caap", pngs[0], "--out", str(tmp_path / "r.html")]))
    assert "is not writable" in line and "--out" in line


def test_decompression_bomb_png(tmp_path, monkeypatch):
    from PIL import Image

    big = _png(tmp_path / "bomb.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x the limit
    line = _one_error_line(runner.invoke(app, ["caap", big, "--out", str(tmp_path / "r.html")]))
    assert "bomb.png" in line and "MAX_IMAGE_PIXELS" in line


def test_pickle_checkpoint_blocked_without_traceback(tmp_path):
    import pickle

    from transformers import ViTConfig

    d = tmp_path / "hf"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8, num_labels=3).save_pretrained(d)
    with open(d / "pytorch_model.bin", "wb") as f:  # a pickle that names a non-tensor global
        pickle.dump({"weights": _Payload(tmp_path / "payload-ran")}, f, protocol=2)
    line = _one_error_line(runner.invoke(app, ["hooks", str(d)]))
    assert "pickle" in line and "safetensors" in line
    assert not (tmp_path / "payload-ran").exists()


class _Payload:
    """Unpickling it would create a file: torch.load(weights_only=True) must refuse."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_malformed_model_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    line = _one_error_line(runner.invoke(app, ["hooks", str(bad)]))
    assert "not valid JSON" in line
    bad.write_text(json.dumps({"config": {}}))
    line = _one_error_line(runner.invoke(app, ["hooks", str(bad)]))
    assert "lacks ['sha256']" in line


def test_disk_full_writing_a_report(tmp_path, pngs, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "c.html"
    line = _one_error_line(runner.invoke(app, ["caap", pngs[0], "--out", str(out)]),
                           after_progress=True)
    assert "no space left on the device" in line and str(out) in line


def test_bench_runs_only_listed_benchmarks():
    line = _one_error_line(runner.invoke(app, ["bench", "../tests/conftest"]))
    assert "unknown benchmark" in line and all(name in line for name in BENCHMARKS)
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"common"}
    assert set(BENCHMARKS) == scripts, ("register every benchmarks/*.py script in "
                                        "patchlens/cli.py BENCHMARKS (and only those)")
