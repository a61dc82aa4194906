"""Per-image token selections (a mask [batch, grid_h, grid_w] or one Rect per image) against a
naive loop over the images with plain run_with_hooks, for every intervention type (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_

import patchlens as pl
from patchlens import InputError, Rect, Site
from patchlens.patching.interventions import Stored

TOL = 1e-10
B = 3


@pytest.fixture(scope="module")
def model():
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=48, image_size=32,
                       patch_size=8, n_classes=5)
    torch.manual_seed(0)
    return perturb_(pl.HookedViT(cfg), std=0.1).double().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    x, src = (torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    ref = torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64)
    masks = torch.zeros(B, 4, 4, dtype=torch.bool)
    masks[0, 1, 1:3] = True                 # 2 patches
    masks[1, 0:2, 0:2] = masks[1, 3, 3] = True  # 5 patches
    masks[2, 2, 0] = True                   # 1 patch
    return x, src, ref, masks


def tokens_of(model, mask) -> list[int]:
    return model.layout.mask_tokens(mask)


def naive(model, x, hook, per_image_fn):
    """Run each image alone; ``per_image_fn(b, act)`` edits its activation in place."""
    out = []
    for b in range(x.shape[0]):
        def fn(act, hook, b=b):
            act = act.clone()
            per_image_fn(b, act)
            return act
        with torch.no_grad():
            out.append(model.run_with_hooks(x[b:b + 1], fwd_hooks=[(hook, fn)]))
    return torch.cat(out)


def cache(model, x, hook):
    with torch.no_grad():
        return model.run_with_cache(x, names_filter=[hook])[1][hook]


# (short name, layer, heads, how to index the selected tokens of one image in [1, ...])
SITES = [
    ("resid_pre", 1, None, lambda t, h: (slice(None), t)),
    ("z", 2, [1, 3], lambda t, h: (slice(None), torch.tensor(t)[:, None], torch.tensor(h))),
    ("pattern", 0, [2], lambda t, h: (slice(None), torch.tensor(h)[:, None], torch.tensor(t))),
    ("mlp_post", 2, None, lambda t, h: (slice(None), t)),
]


def full_name(model, short, layer):
    return Site(short, layers=layer).hook_names(model)[0][0]


@pytest.mark.parametrize("short,layer,heads,where", SITES, ids=[s[0] for s in SITES])
def test_every_intervention_matches_a_per_image_loop(model, data, short, layer, heads, where):
    x, src, ref, masks = data
    hook = full_name(model, short, layer)
    toks = [tokens_of(model, m) for m in masks]
    src_act, ref_act = cache(model, src, hook), cache(model, ref, hook)
    d = torch.randn(ref_act.shape[-1], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    draws = torch.randint(0, ref.shape[0], (1, B), generator=torch.Generator().manual_seed(4))

    def centred(a, hook, site):          # depends on the whole selection: no padding leaks in
        return a - a.mean(dim=tuple(range(1, a.ndim - 1)), keepdim=True)

    def blend(a, hook, site, s):
        return a + 2 * (s - a.mean(dim=tuple(range(1, a.ndim - 1)), keepdim=True))

    def sel(b):
        return where(toks[b], heads)

    def centred_ref(b, a):
        part = a[sel(b)]
        a[sel(b)] = part - part.mean(dim=tuple(range(1, part.ndim - 1)), keepdim=True)

    def blend_ref(b, a):
        part = a[sel(b)]
        s = src_act[b:b + 1][sel(b)]
        a[sel(b)] = part + 2 * (s - part.mean(dim=tuple(range(1, part.ndim - 1)), keepdim=True))

    tok_axis = 1 if short != "pattern" else 2
    pooled_mean = ref_act.mean(0, keepdim=True).mean(tok_axis, keepdim=True).expand(
        1, *ref_act.shape[1:])
    cases = {
        "Interchange": (pl.Interchange(src),
                        lambda b, a: a.__setitem__(sel(b), src_act[b:b + 1][sel(b)])),
        "Stored": (Stored({hook: src_act}), lambda b, a: a.__setitem__(sel(b), src_act[b:b + 1][sel(b)])),
        "Zero": (pl.Zero(), lambda b, a: a.__setitem__(sel(b), 0.0)),
        "Mean": (pl.Mean(ref), lambda b, a: a.__setitem__(sel(b), ref_act.mean(0, keepdim=True)[sel(b)])),
        "Mean(pooled)": (pl.Mean(ref, per_token=False),
                         lambda b, a: a.__setitem__(sel(b), pooled_mean[sel(b)])),
        "Resample": (pl.Resample(ref, seed=4), lambda b, a: a.__setitem__(
            sel(b), ref_act[int(draws[0, b])][None][sel(b)])),
        "Add": (pl.Add(d, 0.7), lambda b, a: a.__setitem__(sel(b), a[sel(b)] + 0.7 * d)),
        "Scale": (pl.Scale(-1.5), lambda b, a: a.__setitem__(sel(b), a[sel(b)] * -1.5)),
        "Custom": (centred, centred_ref),
        "Custom(source)": (pl.Custom(blend, source=src), blend_ref),
    }
    for tokens in (masks, [_rect_of(m) for m in masks] if short == "resid_pre" else None):
        if tokens is None:
            continue
        if isinstance(tokens, list):  # Rects: the bounding boxes of the masks
            toks = [model.layout.rect_tokens((r.r0, r.r1), (r.c0, r.c1)) for r in tokens]
        for name, (iv, ref_fn) in cases.items():
            site = Site(short, layers=layer, tokens=tokens, heads=heads)
            got = pl.patch(model, x, [(site, iv)])
            want = naive(model, x, hook, ref_fn)
            assert (got - want).abs().max() < TOL, (name, type(tokens))


def _rect_of(mask) -> Rect:
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return Rect(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def test_noise_touches_only_each_images_tokens(model, data):
    x, _, _, masks = data
    hook = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        patched = pl.run_variants(model, x, [pl.Variant([(Site(hook, tokens=masks),
                                                          pl.Noise(0.5))])],
                                  capture=[hook]).captured[hook][0]
    clean = cache(model, x, hook)
    for b in range(B):
        toks = tokens_of(model, masks[b])
        others = [t for t in range(clean.shape[1]) if t not in toks]
        assert torch.equal(patched[b, others], clean[b, others])
        diff = patched[b, toks] - clean[b, toks]
        assert (diff != 0).all()


def test_many_variants_and_sweeps_with_per_image_tokens(model, data):
    """Variants sharing an intervention are stacked ([E, B, k] selections); each equals its
    own single-variant run. Recipe.sweep and activation_patching take per-image tokens."""
    x, src, _, masks = data
    iv = pl.Interchange(src)
    variants = [pl.Variant([(Site("resid_pre", layers=layer, tokens=masks), iv)], layer)
                for layer in range(3)]
    variants.append(pl.Variant([(Site("resid_pre", layers=0, tokens=~masks), iv)], "inverse"))
    metric = pl.metrics.logit(2)
    many = pl.run_variants(model, x, variants, metric=metric).outputs
    for i, v in enumerate(variants):
        one = pl.run_variants(model, x, [v], metric=metric, prefix_reuse=False).outputs[0]
        assert (many[i] - one).abs().max() < TOL
    res = pl.Recipe([(Site("resid_pre", tokens=masks), iv)]).sweep(model, x, metric,
                                                                    layers=range(3))
    assert (res.per_example.T - many[:3]).abs().max() < TOL
    act = pl.activation_patching(model, src, x, metric, per="layer", tokens=masks)
    assert (act.per_example.T - many[:3]).abs().max() < TOL
    reg = pl.activation_patching(model, src, x, metric, per="region",
                                 regions={"digit": masks, "rest": ~masks}, layers=[0])
    assert (reg.per_example[:, 0, 0] - many[0]).abs().max() < TOL
    assert (reg.per_example[:, 0, 1] - many[3]).abs().max() < TOL


def test_attribution_patching_sums_each_images_tokens(model, data):
    """method='attribution' sums (a_src - a_tgt) . grad over each image's own tokens."""
    x, src, _, masks = data
    metric = pl.metrics.logit(1)
    est = pl.activation_patching(model, src, x, metric, per="layer", tokens=masks,
                                 method="attribution", layers=[1])
    hook = "blocks.1.hook_resid_pre"
    from patchlens.patching.engine import capture, capture_grads

    a_src = capture(model, src, [hook]).acts[hook]
    tgt = capture_grads(model, x, [hook], metric)
    prod = (a_src - tgt.acts[hook]) * tgt.grads[hook]
    for b in range(B):
        toks = tokens_of(model, masks[b])
        want = tgt.values[b] + prod[b, toks].sum()
        assert abs(float(est.per_example[b, 0]) - float(want)) < TOL


def test_rect_from_pixel_boxes():
    # box (x0, y0, x1, y1) = columns 10..29, rows 3..8 in pixels; 8x8 patches
    assert Rect.from_box((10, 3, 30, 9), 8) == Rect(0, 2, 1, 4)
    assert Rect.from_box((10, 3, 30, 17), (8, 8), cover="all") == Rect(1, 2, 2, 3)
    with pytest.raises(InputError, match="No whole"):
        Rect.from_box((10, 3, 14, 9), 8, cover="all")
    with pytest.raises(InputError, match="empty"):
        Rect.from_box((10, 3, 10, 9), 8)
    model = pl.HookedViT(pl.ViTConfig(d_model=16, d_head=4, n_heads=4, n_layers=1, d_mlp=16,
                                      image_size=32, patch_size=8, n_classes=2))
    boxes = torch.tensor([[0, 0, 8, 8], [9, 17, 32, 32]])
    assert Rect.from_boxes(boxes, model) == [Rect(0, 1, 0, 1), Rect(2, 4, 1, 4)]


def test_per_image_errors(model, data):
    x, src, ref, masks = data
    with pytest.raises(InputError, match="for 3 images, but the target batch has 2"):
        pl.patch(model, x[:2], [(Site("resid_pre", layers=0, tokens=masks), pl.Zero())])
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(InputError, match="the mask of image 1 selects no token"):
        pl.patch(model, x, [(Site("resid_pre", layers=0, tokens=empty), pl.Zero())])
    with pytest.raises(InputError, match="per-image"):
        pl.activation_patching(model, src, x, pl.metrics.logit(0), per="token", tokens=masks)
    with pytest.raises(InputError, match="source_activation"):
        pl.Custom(lambda a, h, s: a, source=src)
    from patchlens.diagnostics import Reference

    refd = Reference.fit(model, ref, sites=["resid_pre"])
    with pytest.raises(InputError, match="per-image selection"):
        pl.activation_patching(model, src, x, pl.metrics.logit(0), per="layer", tokens=masks,
                               diagnose=refd)
    assert all(not h.fwd_hooks for h in model.hook_dict.values())
