"""Tests of the embedded zoo: the clutter-digits generator, training, registry and loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import patchlens.zoo as zoo
from patchlens.zoo import clutter_digits as cd
from patchlens.zoo.clutter_digits import CORNER, MARKER_BOX, MARKER_COLORS, generate

# ---- generator --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    return generate(64, split="test", seed=7, shortcut="train")


def test_shapes_and_ranges(batch):
    n = 64
    assert batch.images.shape == (n, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (n,) and batch.labels.dtype == torch.long
    assert batch.masks.shape == (n, 64, 64) and batch.masks.dtype == torch.bool
    assert batch.boxes.shape == (n, 4) and batch.marker_boxes.shape == (n, 4)
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert set(batch.labels.tolist()) <= set(range(10))
    assert batch.masks.flatten(1).any(1).all()  # every image has a digit
    assert len(batch) == n and len(batch[:5]) == 5 and len(batch[3]) == 1


def test_deterministic():
    a = generate(20, split="train", seed=3, shortcut="train")
    b = generate(20, split="train", seed=3, shortcut="train")
    for name in ("images", "labels", "masks", "boxes", "marker_labels", "marker_boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = generate(20, split="train", seed=4, shortcut="train")
    assert not torch.equal(a.images, c.images)
    d = generate(20, split="test", seed=3, shortcut="train")
    assert not torch.equal(a.images, d.images)


def test_splits_disjoint():
    tr, te = cd.split_indices("train"), cd.split_indices("test")
    assert len(np.intersect1d(tr, te)) == 0
    assert len(tr) + len(te) == len(cd.digit_scans()[1]) == 1797
    assert abs(len(tr) / 1797 - 0.75) < 0.01
    assert set(cd.digit_scans()[1][te]) == set(range(10))
    g = generate(300, split="test", seed=0)
    assert np.isin(g.scan_ids.numpy(), te).all()
    g = generate(300, split="train", seed=0)
    assert np.isin(g.scan_ids.numpy(), tr).all()
    with pytest.raises(ValueError):
        generate(2, split="val")


def test_mask_is_exactly_the_drawn_digit():
    full = generate(32, seed=11)
    bare = generate(32, seed=11, clutter=False, background=False)
    # digits (and so masks, boxes, labels) do not depend on clutter/background
    assert torch.equal(full.masks, bare.masks) and torch.equal(full.labels, bare.labels)
    ink = bare.images.amax(1) > 0  # black canvas: only the digit has ink
    assert torch.equal(bare.masks, ink)
    # outside the mask the digit changed nothing: identical to the digit-free composition
    # (checked on the bare canvas: every non-mask pixel is exactly 0)
    assert (bare.images.amax(1)[~bare.masks] == 0).all()


def test_boxes_are_mask_extents(batch):
    for m, (x0, y0, x1, y1) in zip(batch.masks, batch.boxes.tolist()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert (x0, y0, x1, y1) == (
            xs.min().item(),
            ys.min().item(),
            xs.max().item() + 1,
            ys.max().item() + 1,
        )


def test_digit_placement_avoids_grid_and_corner(batch):
    assert not batch.masks[:, :CORNER, :CORNER].any()
    rng = np.random.default_rng(0)
    scan, size, xs, ys = cd._digit_params(rng, 2000, "test", (64, 64), (24, 32), 8)
    assert (xs % 8 != 0).all() and (ys % 8 != 0).all()
    assert not ((xs < CORNER) & (ys < CORNER)).any()
    assert (xs >= 0).all() and (xs + size <= 64).all() and (ys + size <= 64).all()
    assert size.min() == 24 and size.max() == 32


def test_patch_masks_borders():
    g = generate(2, seed=0)
    m = torch.zeros(2, 64, 64, dtype=torch.bool)
    m[0, 63, :] = True  # last row
    m[0, :, 63] = True  # last column
    m[1, 56:, 56:] = True  # bottom-right patch fully covered
    g.masks = m
    frac = g.patch_masks(8)
    assert frac.shape == (2, 8, 8)
    expect = torch.zeros(8, 8)
    expect[7, :] = 1 / 8
    expect[:, 7] = 1 / 8
    expect[7, 7] = 15 / 64
    assert torch.allclose(frac[0], expect)
    assert frac[1, 7, 7] == 1 and frac[1].sum() == 1
    assert torch.equal(g.patch_masks(8, threshold=0.0)[0], expect > 0)
    assert g.patch_masks(8, threshold=0.5)[1].sum() == 1
    assert g.patch_masks((16, 8)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        g.patch_masks(7)


def test_patch_masks_match_pixel_count(batch):
    frac = batch.patch_masks(8)
    assert torch.allclose(frac.sum((1, 2)) * 64, batch.masks.sum((1, 2)).float())


def _marker_pixels(g):
    x0, y0, x1, y1 = MARKER_BOX
    return g.images[:, :, y0:y1, x0:x1]


def test_shortcut_on_off_conflict():
    n = 100
    on = generate(n, seed=9, shortcut="on")
    off = generate(n, seed=9, shortcut="off")
    conf = generate(n, seed=9, shortcut="conflict")
    none = generate(n, seed=9)
    assert torch.equal(on.labels, off.labels) and torch.equal(on.masks, conf.masks)
    assert torch.equal(on.marker_labels, on.labels)
    assert (off.marker_labels == -1).all() and (off.marker_boxes == -1).all()
    assert torch.equal(off.images, none.images)
    assert (conf.marker_labels != conf.labels).all() and (conf.marker_labels >= 0).all()
    assert len(set(conf.marker_labels.tolist())) > 5
    assert (on.marker_boxes == torch.tensor(MARKER_BOX)).all()
    # the marker colour encodes the marker label; everything else is unchanged
    colors = torch.from_numpy(MARKER_COLORS)
    assert torch.equal(_marker_pixels(on), colors[on.labels][:, :, None, None].expand(-1, -1, 6, 6))
    assert torch.equal(
        _marker_pixels(conf), colors[conf.marker_labels][:, :, None, None].expand(-1, -1, 6, 6)
    )
    x0, y0, x1, y1 = MARKER_BOX
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(on.images[:, :, outside], off.images[:, :, outside])
    assert len({tuple(c) for c in MARKER_COLORS.tolist()}) == 10


def test_shortcut_train_probability_and_no_overlap():
    g = generate(1000, split="train", seed=2, shortcut="train", marker_prob=0.9)
    has = g.has_marker
    assert 0.86 < has.float().mean() < 0.94
    assert torch.equal(g.marker_labels[has], g.labels[has])
    # neither the digit nor the clutter touches the marker's corner region
    assert not g.masks[:, :CORNER, :CORNER].any()
    clean = generate(50, seed=2, shortcut="off")
    corner = clean.images[:, :, :CORNER, :CORNER]
    bg = generate(50, seed=2, shortcut="off", clutter=False).images[:, :, :CORNER, :CORNER]
    assert torch.equal(corner, bg)


def test_generation_is_fast():
    import time

    t = time.perf_counter()
    generate(1000, split="train", seed=0, shortcut="train")
    assert time.perf_counter() - t < 10.0  # ~1 s on one free core; generous for shared CI


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate(2, image_size=32)
    with pytest.raises(ValueError):
        generate(2, shortcut="sometimes")


# ---- registry -------------------------------------------------------------------------------


def test_unknown_name_lists_available():
    with pytest.raises(zoo.UnknownModelError) as e:
        zoo.load("clutter-digit-vit")
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    for name in zoo.names():
        assert name in msg
    assert "Did you mean" in msg
    assert not zoo.is_zoo_name("vit_base_patch16_224")


def test_list():
    entries = zoo.list()
    names = [n for n, _ in entries]
    assert names == zoo.names()
    assert {"clutter-digits-vit", "clutter-digits-shortcut-vit"} <= set(names)
    assert all(isinstance(d, str) and d for _, d in entries)
    assert "clutter-digits-vit" in str(entries)
    assert zoo.is_zoo_name("clutter-digits-vit") and zoo.is_zoo_name("zoo:clutter-digits-vit")


# ---- loading and recorded accuracy (needs the model class) -------------------------------------

hooked = pytest.importorskip("patchlens.model.hooked_vit")


@pytest.mark.parametrize(
    "name, mode",
    [
        ("clutter-digits-vit", "clean"),
        ("clutter-digits-shortcut-vit", "off"),
        ("clutter-digits-shortcut-vit", "conflict"),
    ],
)
def test_load_reproduces_recorded_subset_accuracy(name, mode):
    from patchlens.zoo.train import EVAL_SEED, _normalise

    model = zoo.load(name)
    assert isinstance(model, hooked.HookedViT) and not model.training
    rec = zoo.info(name)
    ev = rec["eval"][mode]
    k = ev["subset_n"]
    data = generate(
        rec["eval"]["n"], split="test", seed=EVAL_SEED, shortcut=None if mode == "clean" else mode
    )[:k]
    with torch.no_grad():
        logits = model(_normalise(data.images))
    correct = int((logits.argmax(-1) == data.labels).sum())
    # the count was recorded on another CPU: exact, except that an image whose two top logits
    # are within 1e-3 (float32 rounding of another CPU's kernels is ~1e-6) may flip
    top2 = logits.topk(2, dim=-1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-3).sum())
    assert abs(correct - ev["subset_correct"]) <= near_ties, (correct, near_ties)
    assert rec["eval"]["n"] == 2000 and k == 200


def test_clean_model_meets_accuracy_target():
    assert zoo.info("clutter-digits-vit")["eval"]["clean"]["accuracy"] >= 0.97


def test_shortcut_model_uses_the_marker():
    ev = zoo.info("clutter-digits-shortcut-vit")["eval"]
    assert ev["on"]["accuracy"] > ev["off"]["accuracy"] > ev["conflict"]["accuracy"]
    assert ev["conflict"]["follows_marker"] > 0.5


def test_preprocess_matches_training_normalisation():
    model = zoo.load("clutter-digits-vit")
    assert model.cfg.data_mean == (0.5, 0.5, 0.5) and model.cfg.data_std == (0.5, 0.5, 0.5)


def test_sha_check_catches_corruption(tmp_path):
    from patchlens.zoo.registry import WEIGHTS_DIR, ChecksumError, load_from

    name = "clutter-digits-vit"
    for ext in (".json", ".safetensors"):
        shutil.copy(WEIGHTS_DIR / f"{name}{ext}", tmp_path / f"{name}{ext}")
    load_from(tmp_path / f"{name}.json")  # intact copy loads
    st = tmp_path / f"{name}.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-10] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_from(tmp_path / f"{name}.json")


def test_weights_small_and_float32():
    from safetensors import safe_open

    from patchlens.zoo.registry import WEIGHTS_DIR

    for name in zoo.names():
        path = WEIGHTS_DIR / f"{name}.safetensors"
        assert path.stat().st_size <= 10 * 2**20
        with safe_open(str(path), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


def test_tiny_training_run(tmp_path):
    from patchlens.zoo.train import train

    rec = train(
        "clutter-digits-shortcut-vit",
        steps=3,
        batch_size=8,
        out=tmp_path,
        eval_n=16,
        progress=False,
    )
    st, js = (
        tmp_path / "clutter-digits-shortcut-vit.safetensors",
        tmp_path / "clutter-digits-shortcut-vit.json",
    )
    assert st.exists() and js.exists()
    saved = json.loads(js.read_text())
    assert saved["sha256"] == rec["sha256"]
    assert set(saved["eval"]) >= {"on", "off", "conflict"}
    assert 0.0 <= saved["eval"]["conflict"]["follows_marker"] <= 1.0
    from patchlens.zoo.registry import load_from

    model = load_from(js)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
