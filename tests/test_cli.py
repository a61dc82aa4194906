"""The patchlens command: help texts, user errors as one line with exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from patchlens.cli import app

runner = CliRunner()


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


def _one_error_line(res):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
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
    line = _one_error_line(runner.invoke(app, ["caap", str(bad)]))
    assert "bad.png" in line


def test_bad_layers(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(img)
    line = _one_error_line(runner.invoke(app, ["caap", str(img), "--layers", "x:y"]))
    assert "--layers" in line


def test_caap_and_patch_write_reports(tmp_path):
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    res = runner.invoke(app, ["caap", paths[0], "--layers", "2:6", "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.html").stat().st_size > 100_000
    res = runner.invoke(app, ["patch", *paths, "--per", "layer", "--out", str(tmp_path / "p.html")])
    assert res.exit_code == 0, res.output
    assert "PatchResult" in res.output
