"""Nothing silently wrong (issue 15): float64 in, float64 out for CAAP, the seven baselines and
the attribution metrics, each against a float64 reference written out here; half-precision
models; and every refusal the issue lists, one test each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_, torch_threads
from test_caap import naive_caap

import patchlens as pl
import patchlens.diagnostics  # noqa: F401  (pl.diagnostics)
from patchlens import HookedViT, InputError, PatchlensError, Rect, Site, ViTConfig
from patchlens.attribution import METHODS, chefer, gradcam, integrated_gradients, occlusion, rise
from patchlens.attribution import metrics as am
from patchlens.metrics import recovery_denominator
from patchlens.model.preprocess import blur

CFG = dict(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=64, image_size=(32, 32),
           patch_size=(8, 8), n_classes=5)
FAST = {"rise": dict(n_masks=16, batch_size=8), "integrated_gradients": dict(n_steps=4)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and a busy machine does not stall a second one."""
    with torch_threads(1):
        yield


def _model(dtype=torch.float64, **kw) -> HookedViT:
    torch.manual_seed(0)
    return perturb_(HookedViT(ViTConfig(**{**CFG, **kw})).eval(), std=0.2).to(dtype)


@pytest.fixture(scope="module")
def m64() -> HookedViT:
    return _model()


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def no_hooks(model) -> bool:
    return not any(h.fwd_hooks or h.bwd_hooks or h._forward_hooks or h._backward_hooks
                   for h in model.hook_dict.values())


def _logit(model, x, t):
    return model(x).gather(1, t.view(-1, 1))[:, 0]


def _kept(model, x, names):
    """Activations at ``names`` attached to the graph (plain run_with_hooks)."""
    kept = {}

    def keep(a, hook):
        kept[hook.name] = a
        return a

    logits = model.run_with_hooks(x, fwd_hooks=[(n, keep) for n in names])
    return logits, kept


# ---- float64 in, float64 out: each method against a float64 reference ---------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_keeps_float64(m64, x64, name):
    amap = METHODS[name](m64, x64, **FAST.get(name, {}))
    assert amap.values.dtype == torch.float64
    assert torch.isfinite(amap.values).all() and no_hooks(m64)


def test_caap_equals_float64_loop():
    model = _model(image_size=(40, 40), n_layers=4)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for context, site, score, group, layers in [("blur", "resid_pre", "logit", 1, (1, 3)),
                                                ("mean", "mlp_out", "log_probability", 2, (0, 4))]:
        amap = pl.caap(model, x, layers=layers, context=context, site=site,
                                  score=score, group=group, batch_size=5)
        tgt = model(x).argmax(-1)
        ctx = (blur(model.cfg, x, 11, 5.0) if context == "blur"
               else torch.zeros_like(x))
        want = naive_caap(model, x, ctx, tgt, layers, site, score, group)
        assert amap.values.dtype == torch.float64
        assert (amap.values - want).abs().max() < 1e-12
        assert want.abs().max() > 1e-3


def test_chefer_and_class_attention_float64(m64, x64):
    tgt = torch.tensor([3, 1])
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    logits, kept = _kept(m64, x64, names)
    grads = torch.autograd.grad(logits[0, 3] + logits[1, 1], [kept[n] for n in names])
    want = torch.zeros(2, 16, dtype=torch.float64)
    for b in range(2):
        r = torch.eye(17, dtype=torch.float64)
        for n, g in zip(names, grads):
            r = r + (g[b] * kept[n][b].detach()).clamp(min=0).mean(0) @ r
        want[b] = r[0, 1:]
    assert (chefer(m64, x64, target=tgt).values - want.view(2, 4, 4)).abs().max() < 1e-12
    last = kept[names[-1]].detach()[:, :, 0, 1:].mean(1).view(2, 4, 4)
    assert (METHODS["class_attention"](m64, x64).values - last).abs().max() < 1e-14
    assert all(p.grad is None for p in m64.parameters())


def test_rollout_float64(m64, x64):
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    with torch.no_grad():
        _, kept = _kept(m64, x64, names)
    want = torch.zeros(2, 16, dtype=torch.float64)
    for b in range(2):
        v = torch.zeros(17, dtype=torch.float64)
        v[0] = 1.0
        for n in reversed(names):
            a = 0.3 * torch.eye(17, dtype=torch.float64) + 0.7 * kept[n][b].amax(0)
            v = v @ (a / a.sum(-1, keepdim=True))
        want[b] = v[1:]
    got = METHODS["rollout"](m64, x64, head_fusion="max", residual=0.3).values
    assert (got - want.view(2, 4, 4)).abs().max() < 1e-14


def test_gradcam_float64_equals_formula(m64, x64):
    """Grad-CAM on blocks[1].ln1: channel weights = mean gradient over the grid, ReLU of the
    weighted sum, then (cam - min) / (max - min) per image."""
    tgt = torch.tensor([2, 4])
    name = "blocks.1.ln1.hook_normalized"
    logits, kept = _kept(m64, x64, [name])
    (g,) = torch.autograd.grad(logits[0, 2] + logits[1, 4], [kept[name]])
    a = kept[name].detach()[:, 1:].reshape(2, 4, 4, 32)
    w = g[:, 1:].reshape(2, 4, 4, 32).mean((1, 2))
    cam = (a * w[:, None, None]).sum(-1).clamp(min=0)
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / cam.amax((1, 2), keepdim=True)
    got = gradcam(m64, x64, target=tgt, layer=1)
    assert got.values.dtype == torch.float64
    assert (got.values - cam).abs().max() < 1e-12
    assert all(p.grad is None for p in m64.parameters()) and no_hooks(m64)


def test_gradcam_float32_matches_the_library_pipeline():
    """The dtype-keeping Grad-CAM equals pytorch-grad-cam's own output (float32, its
    float32 scaling with a 1e-7 epsilon applied twice)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _model(torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def reshape(t):
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[-1]).permute(0, 3, 1, 2)

    class Grid(GradCAM):
        def get_target_width_height(self, input_tensor):
            return 4, 4

    cam = Grid(model=model, target_layers=[model.blocks[1].ln1], reshape_transform=reshape)
    want = torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 2))
    cam.activations_and_grads.release()
    model.zero_grad(set_to_none=True)
    got = gradcam(model, x, target=1, layer=1).values
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# the hand-written path starts at a constant 0.25 image, which does look like a raw [0, 1] image
@pytest.mark.filterwarnings("ignore:The images are all in")
def test_integrated_gradients_float64_and_equal_to_captum(m64, x64):
    tgt = torch.tensor([0, 3])
    nodes, weights = np.polynomial.legendre.leggauss(5)
    want = torch.zeros(2, 4, 4, dtype=torch.float64)
    base = torch.full_like(x64[:1], 0.25)
    for b in range(2):
        total = torch.zeros_like(x64[b])
        for node, wt in zip(nodes, weights):
            z = (base[0] + (node + 1) / 2 * (x64[b] - base[0]))[None].requires_grad_(True)
            (g,) = torch.autograd.grad(_logit(m64, z, tgt[b:b + 1]).sum(), z)
            total += wt / 2 * g[0]
        attr = (total * (x64[b] - base[0])).sum(0)
        want[b] = attr.reshape(4, 8, 4, 8).sum((1, 3))
    got = integrated_gradients(m64, x64, target=tgt, n_steps=5, baseline=base,
                               internal_batch_size=3)
    assert (got.values - want).abs().max() < 1e-12
    # completeness (Sundararajan et al.): the attributions sum to F(x) - F(baseline)
    diff = _logit(m64, x64, tgt) - _logit(m64, base.expand_as(x64), tgt)
    many = integrated_gradients(m64, x64, target=tgt, n_steps=48, baseline=base).values
    torch.testing.assert_close(many.sum((1, 2)), diff.detach(), atol=1e-6, rtol=1e-6)

    from captum.attr import IntegratedGradients

    model = _model(torch.float32)
    x = x64.float()
    ref = IntegratedGradients(model).attribute(x, baselines=0.0, target=[0, 3], n_steps=5)
    ref = ref.sum(1).reshape(2, 4, 8, 4, 8).sum((2, 4))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(integrated_gradients(model, x, tgt, n_steps=5).values, ref,
                               atol=1e-5, rtol=1e-4)


def test_occlusion_float64_and_equal_to_captum(m64, x64):
    tgt = torch.tensor([1, 2])
    with torch.no_grad():
        full = _logit(m64, x64, tgt)
        want = torch.zeros(2, 4, 4, dtype=torch.float64)
        for r in range(4):
            for c in range(4):
                occ = x64.clone()
                occ[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0
                want[:, r, c] = full - _logit(m64, occ, tgt)  # logit units
    got = occlusion(m64, x64, target=tgt, perturbations_per_eval=5)
    assert (got.values - want).abs().max() < 1e-12

    from captum.attr import Occlusion

    model = _model(torch.float32)
    x = x64.float()
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                                     baselines=0.0, target=[1, 2])
    ref = ref.mean(1).reshape(2, 4, 8, 4, 8).mean((2, 4))  # captum's per-input drop, per patch
    torch.testing.assert_close(occlusion(model, x, target=tgt).values, ref, atol=1e-5,
                               rtol=1e-4)
    # a window that does not divide the image: the last tiles are smaller, every pixel counted
    tiles = occlusion(m64, x64, target=tgt, window=3).values
    assert torch.isfinite(tiles).all() and tiles.abs().sum() > 0


def test_rise_float64(m64, x64):
    """RISE as written in the paper: the seeded masks, one forward per mask, in float64."""
    n, s, p_keep, seed = 6, 2, 0.5, 4
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n, 1, s, s, generator=g) < p_keep).double()
    up = F.interpolate(grid, size=(3 * 16, 3 * 16), mode="bilinear", align_corners=False)
    dx = torch.randint(0, 16, (n,), generator=g)
    dy = torch.randint(0, 16, (n,), generator=g)
    tgt = torch.tensor([4, 0])
    want = torch.zeros(2, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            mask = up[i, 0, dx[i]:dx[i] + 32, dy[i]:dy[i] + 32]
            p = m64(x64 * mask).softmax(-1).gather(1, tgt[:, None])[:, 0]
            want += p[:, None, None] * mask
    want = F.avg_pool2d((want / (n * p_keep))[:, None], 8)[:, 0]
    got = rise(m64, x64, target=tgt, n_masks=n, cells=s, p_keep=p_keep, seed=seed, batch_size=4)
    assert (got.values - want).abs().max() < 1e-13


def test_attribution_metrics_float64(m64, x64):
    maps = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tgt = torch.tensor([1, 3])
    order = torch.argsort(-maps.flatten(1), dim=1, stable=True)
    counts = list(range(0, 16, 3)) + [16]
    curve = torch.zeros(2, len(counts), dtype=torch.float64)
    with torch.no_grad():
        for b in range(2):
            for k, c in enumerate(counts):
                keep = torch.ones(16, dtype=torch.float64)
                keep[order[b, :c]] = 0
                pix = keep.view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
                curve[b, k] = m64(x64[b:b + 1] * pix).softmax(-1)[0, tgt[b]]
    auc = torch.trapezoid(curve, torch.tensor(counts, dtype=torch.float64) / 16, dim=-1)
    got, got_curve = am.deletion(m64, x64, maps, tgt, step=3, batch_size=5, return_curve=True)
    assert got.dtype == got_curve.dtype == torch.float64
    assert (got_curve - curve).abs().max() < 1e-14 and (got - auc).abs().max() < 1e-14
    pos = am.perturbation(m64, x64, maps, tgt, fractions=(0.0, 0.25, 0.5))
    assert pos.dtype == torch.float64
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True
    energy = am.energy_pointing_game(maps, masks)
    pos_mass = maps.clamp(min=0)
    torch.testing.assert_close(energy, pos_mass[:, 0, 0] / pos_mass.sum((1, 2)), atol=1e-15,
                               rtol=0)
    assert am.pointing_game(maps, masks).dtype == torch.float64


# ---- half-precision models: results in float32 -----------------------------------------------
@pytest.mark.parametrize("dtype,rel,cos", [(torch.float16, 0.02, 0.999),
                                           (torch.bfloat16, 0.2, 0.98)])
def test_half_precision_models(dtype, rel, cos):
    """Every method runs on a half-precision model and returns float32 maps that agree with
    the same model in float32 up to the half precision of its activations (measured on this
    model: float16 within 0.8% of the largest value, bfloat16 within 13%, CAAP's logit
    differences being the least precise; cosine similarity >= 0.9999 / 0.99)."""
    ref_model = _model(torch.float32)
    model = _model(torch.float32).to(dtype)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("chefer", "gradcam", "rollout", "class_attention", "integrated_gradients",
                 "occlusion", "rise", "caap"):
        half = METHODS[name](model, x.to(dtype), target=[1, 2], **FAST.get(name, {}))
        full = METHODS[name](ref_model, x, target=[1, 2], **FAST.get(name, {}))
        assert half.values.dtype == torch.float32, name
        assert torch.isfinite(half.values).all(), name
        scale = full.values.abs().max()
        assert (half.values - full.values).abs().max() <= rel * scale, name
        assert F.cosine_similarity(half.values.flatten(), full.values.flatten(), 0) >= cos, name
        assert no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


# ---- refused: wrong dtypes say what to do -----------------------------------------------------
def test_images_of_another_dtype_are_refused_with_advice(m64, x64):
    x32 = x64.float()
    calls = [
        lambda: m64(x32),
        lambda: m64.run_with_cache(x32),
        lambda: pl.activation_patching(m64, x32, x32, pl.metrics.logit(0)),
        lambda: pl.caap(m64, x32),
        lambda: pl.patch(m64, x64, [(Site("resid_pre", layers=0), pl.Interchange(x32))]),
        lambda: pl.patch(m64, x64, [(Site("resid_pre", layers=0), pl.Mean(x32))]),
        lambda: pl.caap(m64, x64, context="mean_activation", reference=x32),
    ] + [lambda name=name: METHODS[name](m64, x32) for name in METHODS]
    for call in calls:
        with pytest.raises(InputError, match=r"float32 but the model is torch.float64.*"
                                             r"\.to\(torch.float64\).*model.preprocess"):
            call()
        assert no_hooks(m64)
    half = _model(torch.float16)
    with pytest.raises(InputError, match=r"\.to\(torch.float16\)"):
        half(x32)
    # the model's own preprocess gives the right dtype
    assert half.preprocess(torch.rand(3, 32, 32)).dtype == torch.float16


def test_autocast_leaves_the_dtype_to_autocast():
    model = _model(torch.float32)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()
    with pytest.raises(InputError, match="bfloat16 but the model is torch.float32"):
        model(x)


# ---- refused: the list, one by one ------------------------------------------------------
def test_return_type_bogus_everywhere(m64, x64):
    pairs = [(Site("resid_pre", layers=0), pl.Zero())]
    for call in [lambda: pl.patch(m64, x64, pairs, return_type="bogus"),
                 lambda: pl.Recipe(pairs).run(m64, x64, return_type="bogus"),
                 lambda: pl.run_variants(m64, x64, [pl.Variant(pairs)], return_type="bogus"),
                 lambda: pl.run_variants(m64, x64, [pl.Variant(pairs)], return_type="bogus",
                                         metric=pl.metrics.logit(0)),
                 lambda: pl.patching.engine.capture(m64, x64, [], return_type="bogus")]:
        with pytest.raises(InputError, match="return_type must be one of"):
            call()
    assert no_hooks(m64)


def test_fractional_batch_size_everywhere(m64, x64):
    metric = pl.metrics.logit(0)
    pairs = [(Site("resid_pre", layers=0), pl.Zero())]
    calls = [
        lambda b: pl.activation_patching(m64, x64, x64.flip(0), metric, batch_size=b),
        lambda b: pl.path_patching(m64, x64, x64.flip(0), pl.all_heads(m64)[:2],
                                   pl.Node("resid_final"), metric, batch_size=b),
        lambda b: pl.caap(m64, x64, batch_size=b),
        lambda b: pl.patch(m64, x64, pairs, batch_size=b),
        lambda b: pl.Recipe(pairs).sweep(m64, x64, metric, layers=[0, 1], batch_size=b),
        lambda b: pl.run_variants(m64, x64, [pl.Variant(pairs)], batch_size=b),
        lambda b: pl.patching.engine.capture(m64, x64, [], batch_size=b),
        lambda b: rise(m64, x64, n_masks=4, batch_size=b),
        lambda b: integrated_gradients(m64, x64, n_steps=2, internal_batch_size=b),
        lambda b: am.deletion(m64, x64, torch.rand(2, 4, 4, dtype=torch.float64), 0,
                              batch_size=b),
        lambda b: am.insertion(m64, x64, torch.rand(2, 4, 4, dtype=torch.float64), 0,
                               batch_size=b),
        lambda b: am.perturbation(m64, x64, torch.rand(2, 4, 4, dtype=torch.float64), 0,
                                  batch_size=b),
        lambda b: pl.diagnostics.Reference.fit(m64, x64, batch_size=b),
    ]
    for call in calls:
        for bad in (2.5, 0, True, "2"):
            with pytest.raises(InputError, match="batch_size"):
                call(bad)
    assert no_hooks(m64)


def test_selections_that_were_read_as_something_else(m64, x64):
    metric = pl.metrics.logit(0)
    ap = pl.activation_patching
    with pytest.raises(InputError, match="1-D integer tensor"):
        ap(m64, x64, x64.flip(0), metric, tokens=torch.tensor([1.7]))  # was read as token 1
    with pytest.raises(InputError, match="Token indices must be ints"):
        ap(m64, x64, x64.flip(0), metric, tokens=[True, False])        # was tokens 1 and 0
    with pytest.raises(InputError, match="Token indices must be ints"):
        ap(m64, x64, x64.flip(0), metric, tokens=[[True] * 4] * 4)     # nested-list mask
    with pytest.raises(InputError, match=r"regions\['a'\] must be a boolean"):
        ap(m64, x64, x64.flip(0), metric, per="region", regions={"a": torch.ones(4, 4)})
    with pytest.raises(InputError, match=r"regions\['region0'\] must be a boolean"):
        ap(m64, x64, x64.flip(0), metric, per="region", regions=[[[True] * 4] * 4])
    with pytest.raises(InputError, match="only used with per='region'"):
        ap(m64, x64, x64.flip(0), metric, regions={"a": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(InputError, match="no negative indices"):
        Rect(-1, 1, 0, 2)                                              # wrapped around
    with pytest.raises(InputError, match="Rect takes ints"):
        Rect(0.5, 1, 0, 1)
    with pytest.raises(InputError, match="layer must be an int"):
        pl.Node("z", 1.0, 0)
    with pytest.raises(InputError, match="layers must be an int"):
        ap(m64, x64, x64.flip(0), metric, layers=1.0)
    with pytest.raises(InputError, match="Head indices must be ints"):
        ap(m64, x64, x64.flip(0), metric, per="head", heads=[1.0])
    # a stacked bool tensor of regions and Rect regions are regions too
    top = torch.zeros(2, 4, 4, dtype=torch.bool)
    top[0, :2], top[1, 2:] = True, True
    stacked = ap(m64, x64, x64.flip(0), metric, per="region", regions=top, layers=[1])
    rects = ap(m64, x64, x64.flip(0), metric, per="region", layers=[1],
               regions={"top": Rect(0, 2, 0, 4), "bottom": Rect(2, 4, 0, 4)})
    assert torch.equal(stacked.values, rects.values)
    assert no_hooks(m64)


def test_metrics_refused_before_any_sweep(m64, x64):
    calls = {"n": 0}

    def as_int(lg):
        calls["n"] += 1
        return lg.argmax(-1)

    with pytest.raises(InputError, match="returned torch.int64 values"):
        pl.activation_patching(m64, x64, x64.flip(0), as_int)
    assert calls["n"] == 1  # the clean baseline run, no sweep
    with pytest.raises(InputError, match="metric must be a function"):
        pl.activation_patching(m64, x64, x64.flip(0), 3)
    with pytest.raises(InputError, match="compares a class with itself"):
        pl.metrics.logit_diff(1, 1)
    with pytest.raises(InputError, match=r"example\(s\) \[1\]"):
        pl.metrics.logit_diff([0, 2], [1, 2])
    with pytest.raises(InputError, match="recovery"):
        pl.metrics.recovery(3)
    with pytest.raises(InputError, match="classes must be an int"):
        pl.metrics.logit("cat")


def test_recovery_threshold_is_relative_and_checked_before_the_sweep(m64, x64):
    """A pair whose metrics differ by rounding noise is refused before any variant runs."""
    calls = {"n": 0}

    def metric(lg):
        calls["n"] += 1
        return lg[:, 0].float()

    model = _model(torch.float32)
    x = x64.float()
    near = x + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="rounding"):
        pl.activation_patching(model, x, near, pl.metrics.recovery(metric))
    assert calls["n"] == 2  # the two baseline runs only
    # relative: values of 1e4 that differ by 1e-3 are noise in float32, not in float64
    big = torch.tensor([1e4], dtype=torch.float32)
    with pytest.raises(InputError, match="rounding"):
        recovery_denominator(big + 1e-3, big)
    assert recovery_denominator(big.double() + 1e-3, big.double()).item() == pytest.approx(1e-3)
    # a real pair: patching every token at layer 0 recovers the clean run exactly
    res = pl.activation_patching(m64, x64, x64.flip(0), pl.metrics.recovery(pl.metrics.logit(2)),
                                 per="layer", layers=[0])
    torch.testing.assert_close(res.values, torch.ones_like(res.values), atol=1e-12, rtol=0)


def test_caap_second_class_equal_to_target(m64, x64):
    with pytest.raises(InputError, match="second_class equals the target"):
        pl.caap(m64, x64, target=1, score="logit_diff", second_class=1)
    with pytest.raises(InputError, match=r"image\(s\) \[1\]"):
        pl.caap(m64, x64, target=[0, 2], score="logit_diff", second_class=[1, 2])
    assert no_hooks(m64)


def test_attribution_patching_nan_gradients_raise_and_leave_no_grad(m64, x64):
    def metric(lg):  # finite value, infinite gradient: sqrt'(0)
        return lg[:, 0] + torch.sqrt(lg[:, 0] - lg[:, 0].detach())

    with pytest.raises(InputError, match="non-finite gradient"):
        pl.activation_patching(m64, x64, x64.flip(0), metric, method="attribution")
    assert no_hooks(m64)
    res = pl.activation_patching(m64, x64, x64.flip(0), pl.metrics.logit(1),
                                 method="attribution")
    assert torch.isfinite(res.values).all()
    assert all(p.grad is None for p in m64.parameters())
    assert all(p.requires_grad for p in m64.parameters())


def test_diagnose_must_be_a_reference(m64, x64):
    metric = pl.metrics.logit(0)
    for bad in (True, "yes", 1):
        with pytest.raises(InputError, match="diagnose= takes a fitted"):
            pl.activation_patching(m64, x64, x64.flip(0), metric, diagnose=bad)
        with pytest.raises(InputError, match="diagnose= takes a fitted"):
            pl.path_patching(m64, x64, x64.flip(0), pl.all_heads(m64)[:1],
                             pl.Node("resid_final"), metric, diagnose=bad)
    with pytest.raises(InputError, match="reference must be a fitted"):
        pl.diagnostics.diagnose(m64, x64, [pl.Variant([(Site("resid_pre", layers=0),
                                                        pl.Zero())])], "ref")


def test_empty_batches_everywhere(m64, x64):
    empty = x64[:0]
    metric = pl.metrics.logit(0)
    calls = [
        lambda: pl.activation_patching(m64, empty, empty, metric),
        lambda: pl.path_patching(m64, empty, empty, pl.all_heads(m64)[:1],
                                 pl.Node("resid_final"), metric),
        lambda: pl.caap(m64, empty),
        lambda: pl.patch(m64, empty, [(Site("resid_pre", layers=0), pl.Zero())]),
        lambda: pl.patching.engine.capture(m64, empty, ["hook_pooled"]),
        lambda: am.deletion(m64, empty, torch.zeros(0, 4, 4, dtype=torch.float64), 0),
        lambda: pl.diagnostics.Reference.fit(m64, empty),
    ] + [lambda name=name: METHODS[name](m64, empty, **FAST.get(name, {})) for name in METHODS]
    for call in calls:
        with pytest.raises(InputError, match="empty|no images"):
            call()
        assert no_hooks(m64)


def test_attribution_map_indexing_and_iteration(m64, x64):
    amap = METHODS["rollout"](m64, x64)
    assert [int(a.target[0]) for a in amap] == amap.target.tolist()  # iteration ends
    assert torch.equal(amap[-1].values, amap.values[1:])
    with pytest.raises(IndexError, match="out of range"):
        amap[2]
    with pytest.raises(InputError, match="integer classes"):
        pl.AttributionMap(torch.zeros(1, 2, 2), "x", 1.5)
    with pytest.raises(InputError, match="H must be"):
        amap.upsample(0, 0)
    with pytest.raises(InputError, match="i must be"):
        amap.plot(5)


def test_every_refusal_is_a_patchlens_error():
    """The base class users catch: InputError is also a ValueError, map indices an IndexError."""
    from patchlens.patching.attribution_map import MapIndexError

    assert issubclass(InputError, PatchlensError) and issubclass(InputError, ValueError)
    assert issubclass(MapIndexError, PatchlensError) and issubclass(MapIndexError, IndexError)
    with pytest.raises(InputError, match="at least patch_size"):
        ViTConfig(**{**CFG, "image_size": (4, 30)})
