"""CAAP equals a naive per-patch loop; bad inputs raise InputError and leave no hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_

from patchlens import AttributionMap, HookedViT, InputError, ViTConfig, caap
from patchlens.model.preprocess import blur
from patchlens.recipes.caap import default_layers


@pytest.fixture(scope="module")
def model() -> HookedViT:
    torch.manual_seed(0)
    cfg = ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=4, d_mlp=64, image_size=(40, 40),
                    patch_size=(8, 8), n_classes=5, data_mean=(0.4, 0.5, 0.6),
                    data_std=(0.2, 0.25, 0.3))
    return perturb_(HookedViT(cfg).eval(), std=0.2)  # break the init's symmetries


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))


def _score(logits, kind, tgt, other):
    if kind == "logit":
        return logits.gather(1, tgt[:, None])[:, 0]
    if kind == "probability":
        return logits.softmax(-1).gather(1, tgt[:, None])[:, 0]
    if kind == "log_probability":
        return logits.log_softmax(-1).gather(1, tgt[:, None])[:, 0]
    return logits.gather(1, tgt[:, None])[:, 0] - logits.gather(1, other[:, None])[:, 0]


def naive_caap(model, x, ctx, tgt, layers, site, kind, group, other=None, reference=None):
    """One run_with_hooks per block of patches (the definition, written out)."""
    start, end = layers
    layout = model.layout
    gh, gw = layout.grid
    names = [f"blocks.{l}.hook_{site}" for l in range(start, end)]
    pre_name = f"blocks.{start}.hook_resid_pre"
    with torch.no_grad():
        _, src = model.run_with_cache(x, names_filter=names)
        mean = None
        if reference is not None:
            _, rc = model.run_with_cache(reference, names_filter=[pre_name])
            mean = rc[pre_name].mean(0, keepdim=True)

        def set_mean(act, hook):
            act[:] = mean
            return act

        base_hooks = [(pre_name, set_mean)] if mean is not None else []
        base = _score(model.run_with_hooks(ctx, fwd_hooks=base_hooks), kind, tgt, other)
        out = torch.zeros(x.shape[0], gh, gw)
        for r0 in range(0, gh, group):
            for c0 in range(0, gw, group):
                toks = [layout.token(r, c) for r in range(r0, min(r0 + group, gh))
                        for c in range(c0, min(c0 + group, gw))]

                def put(act, hook, toks=toks):
                    act[:, toks] = src[hook.name][:, toks]
                    return act

                hooks = base_hooks + [(n, put) for n in names]
                s = _score(model.run_with_hooks(ctx, fwd_hooks=hooks), kind, tgt, other)
                out[:, r0:r0 + group, c0:c0 + group] = (s - base).view(-1, 1, 1)
    return out


@pytest.mark.parametrize("context,site,score,group,layers", [
    ("blur", "resid_pre", "logit", 1, (1, 3)),
    ("mean", "resid_pre", "probability", 2, (0, 4)),
    ("zeros", "attn_out", "log_probability", 1, (2, 4)),
    ("noise", "mlp_out", "logit_diff", 3, (1, 2)),
    ("blur", "resid_post", "logit", 5, (2, 3)),
])
def test_caap_equals_naive_loop(model, images, context, site, score, group, layers):
    amap = caap(model, images, layers=layers, context=context, site=site, score=score,
                group=group, batch_size=7)
    with torch.no_grad():
        logits = model(images)
    tgt = logits.argmax(-1)
    other = amap.meta.get("second_class")
    if context == "blur":
        ctx = blur(model.cfg, images, 11, 5.0)
    elif context == "mean":
        ctx = torch.zeros_like(images)
    elif context == "zeros":
        mean = torch.tensor(model.cfg.data_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.cfg.data_std).view(1, 3, 1, 1)
        ctx = ((0 - mean) / std).expand_as(images)
    else:
        ctx = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    expected = naive_caap(model, images, ctx, tgt, layers, site, score, group, other)
    assert amap.values.shape == (3, 5, 5)
    assert torch.equal(amap.target, tgt)
    torch.testing.assert_close(amap.values, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 1e-4  # the comparison is not vacuous
    assert not model.hook_dict["blocks.0.hook_resid_pre"]._forward_hooks


def test_caap_mean_activation_and_image_context(model, images):
    ref = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    tgt = torch.tensor([1, 2, 3])
    amap = caap(model, images, target=tgt, layers=(1, 3), context="mean_activation",
                reference=ref, group=2)
    expected = naive_caap(model, images, torch.zeros_like(images), tgt, (1, 3), "resid_pre",
                          "logit", 2, reference=ref)
    torch.testing.assert_close(amap.values, expected, atol=1e-5, rtol=1e-4)
    ctx_img = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(3))
    amap = caap(model, images, target=0, layers=(2, 4), context=ctx_img)
    expected = naive_caap(model, images, ctx_img.expand_as(images), torch.zeros(3).long(),
                          (2, 4), "resid_pre", "logit", 1)
    torch.testing.assert_close(amap.values, expected, atol=1e-5, rtol=1e-4)


def test_whole_window_from_first_layer_recovers_image(model, images):
    """Patching every patch (group = grid) at every layer from 0 gives the image's own score
    up to the class token, so with resid_pre at layer 0 the map is image - context score."""
    amap = caap(model, images, layers=(0, 1), group=5, context="mean")
    full, base = amap.meta["image_score"], amap.meta["context_score"]
    # the class token's resid_pre at layer 0 is the same for every image (cls + pos embed)
    torch.testing.assert_close(amap.values[:, 0, 0], full - base, atol=1e-5, rtol=1e-4)


def test_result_api(model, images):
    amap = caap(model, images, layers=(1, 3))
    assert isinstance(amap, AttributionMap)
    assert "caap" in repr(amap) and "layers=(1, 3)" in repr(amap)
    df = amap.to_pandas()
    assert len(df) == 3 * 25 and set(df.columns) >= {"image", "row", "col", "value"}
    up = amap.upsample(40, 40)
    assert up.shape == (3, 40, 40) and torch.equal(up[:, :8, :8], amap.values[:, :1, :1].expand(3, 8, 8))
    assert len(amap.plot(0).data) == 2
    assert len(amap.plot([0, 1, 2]).frames) == 3
    assert default_layers(12) == (0, 12) and default_layers(1) == (0, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=(2, 2)), "window"),
    (dict(layers=(0, 5)), "window"),
    (dict(layers=(-1, 2)), "window"),
    (dict(layers=3), "pair"),
    (dict(group=0), "group"),
    (dict(group=6), "group"),
    (dict(group=1.5), "group"),
    (dict(target=5), "out of range"),
    (dict(target=[0, 1]), "3 images"),
    (dict(context=torch.zeros(3, 32, 32)), "context image"),
    (dict(context="sky"), "context must be"),
    (dict(context="mean_activation"), "reference"),
    (dict(site="pattern"), "site"),
    (dict(score="accuracy"), "score"),
    (dict(score="logit", second_class=1), "second_class"),
    (dict(blur_kernel=4), "odd"),
])
def test_bad_inputs(model, images, kwargs, match):
    with pytest.raises(InputError, match=match):
        caap(model, images, **kwargs)
    for hp in model.hook_dict.values():
        assert not hp._forward_hooks


def test_nan_images(model, images):
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        caap(model, bad)
    with pytest.raises(InputError, match="NaN"):
        caap(model, images, context="mean_activation", reference=bad)
