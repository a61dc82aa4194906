"""Sparse autoencoders: splicing (exact with the error term), feature-level interventions and
sweeps against naive loops, attribution, loaders against the formats' published formulas,
training (tiny), feature views, SAE divergence measures, and the zoo SAEs."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import patchlens as pl
from patchlens import HookedViT, InputError, UnknownHookError, ViTConfig
from patchlens.model.hooks import OPTION_FLAGS
from patchlens.sae import SAE

D64 = torch.float64


def _model(dtype=D64, **kw) -> HookedViT:
    torch.manual_seed(0)
    base = dict(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=48, image_size=(32, 32),
                patch_size=(8, 8), n_classes=5)
    base.update(kw)
    return HookedViT(ViTConfig(**base)).eval().to(dtype)


def _sae(kind="relu", d_in=32, d_sae=40, hook="blocks.1.hook_resid_post", seed=1, dtype=D64,
         **kw) -> SAE:
    """A random SAE with nonzero biases (and thresholds that let some features through)."""
    sae = SAE(d_in, d_sae, kind, k=7 if kind == "topk" else None, hook_name=hook, dtype=dtype,
              **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D64).to(dtype) * 0.3)
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(d_sae, generator=g, dtype=D64).to(dtype) * 0.2)
    return sae


def _x(b=3, seed=0, dtype=D64):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _no_stray_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


# ---- splicing ------------------------------------------------------------------------------
HOOKS = [("blocks.1.hook_resid_pre", 32), ("blocks.0.hook_attn_out", 32),
         ("blocks.2.hook_mlp_out", 32), ("blocks.2.hook_resid_post", 32),
         ("blocks.1.mlp.hook_post", 48), ("blocks.1.attn.hook_z", 32),
         ("hook_full_embed", 32), ("hook_pooled", 32)]


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("hook,d_in", HOOKS)
def test_splice_with_error_term_leaves_logits_unchanged(kind, hook, d_in):
    model, x = _model(), _x()
    ref = model(x)
    model.add_sae(_sae(kind, d_in=d_in, hook=hook), use_error_term=True)
    assert (model(x) - ref).abs().max() <= 1e-10
    # and so does the input gradient (the error term keeps its graph)
    xg = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(model(xg)[:, 2].sum(), xg)
    model.reset_saes()
    (g0,) = torch.autograd.grad(model(xg)[:, 2].sum(), xg)
    assert (g1 - g0).abs().max() <= 1e-10
    assert _no_stray_hooks(model)


def _manual_reconstruction(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """x_hat by the published formulas, written out here (no patchlens SAE methods)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.kind == "relu":
        f = pre.clamp_min(0)
    elif sae.kind == "jumprelu":
        f = pre.clamp_min(0) * (pre > sae.threshold)
    else:
        f = torch.zeros_like(pre)
        v, i = pre.topk(sae.k, dim=-1)
        f.scatter_(-1, i, v.clamp_min(0))
    return f @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("hook,d_in", [("blocks.1.hook_resid_post", 32),
                                       ("blocks.1.attn.hook_z", 32), ("hook_pooled", 32)])
def test_splice_without_error_term_is_a_decode_and_replace(kind, hook, d_in):
    model, x = _model(), _x()
    sae = _sae(kind, d_in=d_in, hook=hook)

    def replace(act, hook):
        flat = act.reshape(*act.shape[: act.ndim - (2 if act.shape[-1] != d_in else 1)], d_in)
        return _manual_reconstruction(sae, flat).reshape(act.shape)

    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[(hook, replace)])
        model.add_sae(sae)
        out = model(x)
    assert (out - ref).abs().max() <= 1e-10
    assert (out - model.run_with_hooks(x)).abs().max() <= 1e-10  # hooks API unchanged
    model.reset_saes()
    assert (model(x) - ref).abs().max() > 1e-6  # the plain model differs


def test_sae_hook_points_are_in_the_schema_in_forward_order():
    model = _model()
    model.add_sae(_sae(hook="blocks.1.hook_resid_post"), use_error_term=True)
    model.add_sae(_sae("topk", hook="blocks.0.attn.hook_z"), use_error_term=True)
    names = [n for n in model.hook_specs if "hook_sae_" in n]
    assert len(names) == 12
    base = "blocks.1.hook_resid_post"
    specs = model.hook_specs
    assert specs[f"{base}.hook_sae_acts_post"].axes == ("batch", "pos", "feature")
    assert specs[f"{base}.hook_sae_input"].axes == ("batch", "pos", "d_model")
    assert specs["blocks.0.attn.hook_z.hook_sae_acts_pre"].axes == ("batch", "pos", "feature")
    assert specs["blocks.0.attn.hook_z.hook_sae_output"].axes == ("batch", "pos", "head", "d_head")
    assert specs[f"{base}.hook_sae_acts_post"].feature_axis == 2
    assert specs[f"{base}.hook_sae_acts_post"].layer == 1
    # forward order: run with every hook and compare with the schema's order
    order = []

    def rec(act, hook):
        if hook.name not in order:
            order.append(hook.name)
        return act

    with model.options(**dict.fromkeys(OPTION_FLAGS, True)), torch.no_grad(), \
            model.hooks(fwd_hooks=[(n, rec) for n in model.hook_dict]):
        model(_x())
    fired = [n for n in order]
    schema = [n for n in model.hook_specs if n in fired]
    assert fired == schema
    i = fired.index(base)
    assert fired[i : i + 7] == [base] + [f"{base}.{h}" for h in (
        "hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
        "hook_sae_error", "hook_sae_output")]
    # short names resolve (one SAE per layer: plain aliases)
    assert model.hook_aliases["sae_acts_post"] == {0: "blocks.0.attn.hook_z.hook_sae_acts_post",
                                                   1: f"{base}.hook_sae_acts_post"}
    (rs,) = pl.Site("sae_acts_post", layers=1, features=[3, 1]).resolve(model)
    assert rs.hook == f"{base}.hook_sae_acts_post" and rs.features.tolist() == [1, 3]


def test_two_saes_in_one_layer_get_qualified_aliases():
    model = _model()
    model.add_sae(_sae(hook="blocks.1.hook_resid_pre"))
    assert "sae_acts_post" in model.hook_aliases
    model.add_sae(_sae(hook="blocks.1.hook_resid_post"))
    al = model.hook_aliases
    assert al["resid_pre.sae_acts_post"] == {1: "blocks.1.hook_resid_pre.hook_sae_acts_post"}
    assert al["resid_post.sae_acts_post"] == {1: "blocks.1.hook_resid_post.hook_sae_acts_post"}
    assert "sae_acts_post" not in al
    model.reset_saes("blocks.1.hook_resid_pre")
    assert model.hook_aliases["sae_acts_post"] == {1: "blocks.1.hook_resid_post.hook_sae_acts_post"}


def test_sae_is_outside_the_model_parameters_and_runs_in_its_own_dtype():
    model, x = _model(torch.float32), _x(dtype=torch.float32)
    n_params = len(list(model.parameters()))
    keys = set(model.state_dict())
    sae = _sae(dtype=D64)  # float64 SAE in a float32 model
    ref = model(x)
    model.add_sae(sae, use_error_term=True)
    assert len(list(model.parameters())) == n_params and set(model.state_dict()) == keys
    out = model(x)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5
    assert sae.W_dec.dtype == D64  # not converted


def test_context_manager_restores_what_was_spliced():
    model, x = _model(), _x()
    a, b = _sae(seed=1), _sae(seed=2)
    model.add_sae(a)
    out_a = model(x)
    with model.saes(b, use_error_term=True) as m:
        assert m.acts_to_saes["blocks.1.hook_resid_post"] is b
        with model.saes({"blocks.2.hook_resid_post": _sae(hook=None, seed=3)}):
            assert len(model.acts_to_saes) == 2
        assert len(model.acts_to_saes) == 1
    assert model.acts_to_saes == {"blocks.1.hook_resid_post": a}
    assert (model(x) - out_a).abs().max() == 0
    with pytest.raises(RuntimeError, match="boom"), model.saes(b):
        raise RuntimeError("boom")
    assert model.acts_to_saes["blocks.1.hook_resid_post"] is a
    model.reset_saes()
    assert model.acts_to_saes == {} and not any("sae" in n for n in model.hook_dict)


def test_splice_refuses_bad_input():
    model = _model()
    with pytest.raises(InputError, match="d_in=24"):
        model.add_sae(_sae(d_in=24))
    with pytest.raises(UnknownHookError, match="Closest"):
        model.add_sae(_sae(hook="blocks.1.hook_resid_pots"))
    with pytest.raises(InputError, match="pass hook="):
        model.add_sae(_sae(hook=None))
    with pytest.raises(InputError, match="lacks"):
        model.add_sae(torch.nn.Linear(3, 3), hook="blocks.1.hook_resid_post")
    with pytest.raises(InputError, match="SAEs read vectors"):
        model.add_sae(_sae(), hook="blocks.1.attn.hook_pattern")
    with pytest.raises(InputError, match="No SAE is spliced"):
        model.reset_saes("blocks.1.hook_resid_post")
    model.add_sae(_sae())
    with pytest.raises(InputError, match="already an SAE"):
        model.add_sae(_sae(), hook="blocks.1.hook_resid_post.hook_sae_output")
    with pytest.raises(InputError, match="out of range: that axis has 40"):
        pl.patch(model, _x(), [(pl.Site("sae_acts_post", layers=1, features=[40]), pl.Zero())])
    with pytest.raises(InputError, match="no feature axis"):
        pl.patch(model, _x(), [(pl.Site("sae_output", layers=1, features=[0]), pl.Zero())])
    model.add_hook("blocks.1.hook_resid_post.hook_sae_acts_post", lambda a, hook: a)
    with pytest.raises(InputError, match="hooks attached"):
        model.reset_saes()
    model.reset_hooks()
    model.reset_saes()
    assert _no_stray_hooks(model)


def test_engine_prefix_reuse_with_an_sae_at_the_last_block():
    """A variant that patches only the head starts from the blocks' output: after an SAE at
    the last resid_post (whose hook point holds the SAE's input), not before it."""
    model, x = _model(), _x()
    model.add_sae(_sae(hook="blocks.2.hook_resid_post"))  # no error term: changes the output
    out = pl.patch(model, x, [(pl.Site("pooled"), pl.Scale(1.5))])
    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[("hook_pooled", lambda a, hook: a * 1.5)])
    assert (out - ref).abs().max() <= 1e-10


# ---- feature interventions -------------------------------------------------------------------
def test_feature_ablation_subtracts_its_decoder_row():
    model, x = _model(), _x()
    sae = _sae("topk")
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=hook)
    act = cache[hook]
    f_all = _manual_features(sae, act)                         # [B, T, d_sae]
    feat, toks = 5, [0, 3, 7]

    def subtract(a, hook):
        a = a.clone()
        for t in toks:
            a[:, t] -= f_all[:, t, feat, None] * sae.W_dec[feat]
        return a

    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[(hook, subtract)])
    model.add_sae(sae, use_error_term=True)
    out = pl.patch(model, x, [(pl.Site("sae_acts_post", layers=1, tokens=toks, features=feat),
                               pl.Zero())])
    assert (out - ref).abs().max() <= 1e-10
    assert (f_all[:, toks, feat] != 0).any()  # the feature was active somewhere


def _manual_features(sae: SAE, x):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.zeros_like(pre)
    v, i = pre.topk(sae.k, dim=-1)
    return f.scatter(-1, i, v.clamp_min(0)) if sae.kind == "topk" else pre.clamp_min(0)


@dataclass
class _Case:
    iv: object
    manual: object  # fn(sel_acts [B, T, k], src [B, T, k] or None) -> new


def _cases(ref_imgs):
    return {
        "zero": _Case(pl.Zero(), lambda a, s: torch.zeros_like(a)),
        "interchange": _Case(pl.Interchange(ref_imgs), lambda a, s: s),
        "scale": _Case(pl.Scale(-2.0), lambda a, s: -2.0 * a),
        "add": _Case(pl.Add(torch.tensor([1.5, -0.5], dtype=D64)),
                     lambda a, s: a + torch.tensor([1.5, -0.5], dtype=D64)),
        "mean": _Case(pl.Mean(ref_imgs), lambda a, s: s.mean(0, keepdim=True).expand_as(a)),
        "custom": _Case(lambda a, hook, site: a.flip(-1) * 3, lambda a, s: a.flip(-1) * 3),
    }


@pytest.mark.parametrize("name", ["zero", "interchange", "scale", "add", "mean", "custom"])
def test_every_intervention_at_feature_granularity(name):
    model, x, src = _model(), _x(), _x(seed=5)
    model.add_sae(_sae("jumprelu"), use_error_term=True)
    case = _cases(src)[name]
    hook = "blocks.1.hook_resid_post.hook_sae_acts_post"
    feats, toks = [2, 9], [1, 4]
    with torch.no_grad():
        _, c = model.run_with_cache(src, names_filter=hook)
    s_all = c[hook]

    def manual(a, hook):
        a = a.clone()
        idx = torch.tensor(toks)[:, None], torch.tensor(feats)[None]
        sel = a[:, idx[0], idx[1]]
        a[:, idx[0], idx[1]] = case.manual(sel, s_all[:, idx[0], idx[1]])
        return a

    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[(hook, manual)])
    out = pl.patch(model, x, [(pl.Site("sae_acts_post", layers=1, tokens=toks, features=feats),
                               case.iv)])
    assert (out - ref).abs().max() <= 1e-10
    assert (out - model(x)).abs().max() > 1e-8  # it did something


def test_resample_at_feature_granularity_draws_whole_images():
    model, x, src = _model(), _x(), _x(4, seed=5)
    model.add_sae(_sae(), use_error_term=True)
    out = pl.patch(model, x, [(pl.Site("sae_acts_post", layers=1, features=[0, 3]),
                               pl.Resample(src, seed=3))])
    draws = torch.randint(0, 4, (1, 3), generator=torch.Generator().manual_seed(3))[0]
    hook = "blocks.1.hook_resid_post.hook_sae_acts_post"
    with torch.no_grad():
        _, c = model.run_with_cache(src, names_filter=hook)

    src_acts = c[hook]

    def manual(a, hook):
        a = a.clone()
        a[..., [0, 3]] = src_acts[draws][..., [0, 3]]
        return a

    with torch.no_grad():
        ref = model.run_with_hooks(x, fwd_hooks=[(hook, manual)])
    assert (out - ref).abs().max() <= 1e-10


def test_feature_sweep_equals_a_naive_loop():
    model, clean, corrupted = _model(), _x(2, seed=1), _x(2, seed=2)
    model.add_sae(_sae("topk", hook="blocks.1.hook_resid_post"), use_error_term=True)
    model.add_sae(_sae(hook="blocks.2.hook_mlp_out"), use_error_term=True)
    metric = pl.metrics.logit_diff(1, 3)
    res = pl.activation_patching(model, clean, corrupted, metric, per="feature",
                                 tokens=[0, 5], batch_size=16, progress=False)
    assert res.axes == ("layer", "feature") and res.values.shape == (2, 40)
    for li, layer in enumerate((1, 2)):
        hook = model.hook_aliases["sae_acts_post"][layer]
        with torch.no_grad():
            _, c = model.run_with_cache(clean, names_filter=hook)
        src = c[hook]
        for f in range(40):
            def put(a, hook, f=f, src=src):
                a = a.clone()
                a[:, [0, 5], f] = src[:, [0, 5], f]
                return a

            with torch.no_grad():
                lg = model.run_with_hooks(corrupted, fwd_hooks=[(hook, put)])
            assert abs(float(metric(lg).mean()) - float(res.values[li, f])) <= 1e-10
    sub = pl.activation_patching(model, clean, corrupted, metric, per="feature", layers=1,
                                 features=[7, 3], tokens=[0, 5], progress=False)
    assert sub.labels["feature"] == ["3", "7"]
    assert torch.allclose(sub.values[0], res.values[0, [3, 7]], atol=1e-12)
    full = pl.activation_patching(model, clean, corrupted, metric, per="feature",
                                  site="blocks.2.hook_mlp_out.hook_sae_acts_post", tokens=[0, 5],
                                  progress=False)
    assert full.values.shape == (1, 40)
    assert torch.allclose(full.values[0], res.values[1], atol=1e-12)
    with pytest.raises(InputError, match="feature axis"):
        pl.activation_patching(model, clean, corrupted, metric, per="feature", site="resid_pre")


@pytest.mark.parametrize("layer", [1, 2])
def test_feature_variants_resume_from_the_sae_input(layer):
    """A variant that changes only the hook points of an SAE spliced at a block's output starts
    from the SAE's input (block ``layer`` is not rerun: ``start_layers == layer + 1``) and gives
    what the plain hooked forward pass gives: outputs, captures inside the SAE, at its hook point
    and earlier in its block, and gradients at the SAE's features."""
    from patchlens.model.splice import resume_point
    from patchlens.patching.engine import Variant, run_variants

    model, x, src = _model(), _x(2, seed=1), _x(2, seed=2)
    hook = f"blocks.{layer}.hook_resid_post"
    model.add_sae(_sae("topk", hook=hook), use_error_term=True)
    acts, recons = f"{hook}.hook_sae_acts_post", f"{hook}.hook_sae_recons"
    mid = f"blocks.{layer}.hook_resid_mid"
    assert resume_point(model, acts) == (hook, layer + 1) and resume_point(model, mid) is None
    with torch.no_grad():
        _, c = model.run_with_cache(src, names_filter=acts)
    feats = [[3], [0, 7], [39]]
    variants = [Variant([(pl.Site("sae_acts_post", layers=layer, tokens=[0, 5], features=f),
                          pl.Interchange(src))]) for f in feats]
    variants.append(Variant([(pl.Site("sae_recons", layers=layer, tokens=[2]), pl.Scale(0.5))]))
    metric = pl.metrics.logit_diff(1, 3)
    watch = [acts, recons, hook, mid, "blocks.0.hook_resid_post"]
    res = run_variants(model, x, variants, metric=metric, capture=watch, grads=[acts],
                       keep_outputs=True, progress=False)
    assert res.start_layers == [layer + 1] * 4
    for i, f in enumerate(feats + [None]):
        def put(a, hook, f=f):
            a = a.clone()
            if f is None:
                a[:, [2]] *= 0.5
            else:
                for t in (0, 5):
                    a[:, t, f] = c[acts][:, t, f]
            return a

        at = recons if f is None else acts
        grabbed = {}

        def grab(a, hook, grabbed=grabbed):
            grabbed[hook.name] = a
            return a

        xs = x.clone()
        with torch.enable_grad():
            fwd = [(at, put)] + [(h, grab) for h in watch]
            logits = model.run_with_hooks(xs, fwd_hooks=fwd)
            (g,) = torch.autograd.grad(metric(logits).sum(), grabbed[acts])
        assert (res.raw_outputs[i] - logits.detach()).abs().max() <= 1e-10
        assert (res.outputs[i] - metric(logits).detach()).abs().max() <= 1e-10
        for h in watch:
            assert (res.captured[h][i] - grabbed[h].detach()).abs().max() <= 1e-10, h
        assert (res.grads[acts][i] - g).abs().max() <= 1e-10
    # a gradient or an observer earlier in the block needs the block: no resuming
    seen = []
    again = run_variants(model, x, variants[:1], metric=metric, grads=[mid], progress=False,
                         observers=[(mid, lambda name, a, chunk: seen.append(name))])
    assert again.start_layers == [layer] and seen == [mid]
    assert (again.outputs[0] - res.outputs[0]).abs().max() <= 1e-10
    assert _no_stray_hooks(model)


def test_attribution_over_all_features_then_exact_top():
    from patchlens.sae.attribution import feature_attribution, patch_features

    model, clean, corrupted = _model(), _x(2, seed=1), _x(2, seed=2)
    sae = _sae()
    metric = pl.metrics.logit(2)
    df = patch_features(model, clean, corrupted, metric, sae=sae, top=4)
    assert model.acts_to_saes == {}  # spliced only for the call
    assert len(df) == 40 and df["exact"].notna().sum() == 4
    # the estimate by hand: (a_clean - a_corrupted) . dM/da, summed over tokens, mean over pairs
    model.add_sae(sae, use_error_term=True)
    hook = "blocks.1.hook_resid_post.hook_sae_acts_post"
    _, c_clean = model.run_with_cache(clean, names_filter=hook)
    src = c_clean[hook]
    store = {}

    def keep(a, hook):
        a.retain_grad()
        store["a"] = a
        return a

    xg = corrupted.clone().requires_grad_(True)
    out = model.run_with_hooks(xg, fwd_hooks=[(hook, keep)])
    out[:, 2].sum().backward()
    a = store["a"]
    est = ((src - a.detach()) * a.grad).sum(1).mean(0)
    got = torch.tensor([df.set_index("feature").loc[f, "attribution"] for f in range(40)],
                       dtype=D64)
    assert (got - est).abs().max() <= 1e-10
    # exact values of the top features equal one patched run each
    with torch.no_grad():
        base = float(model(corrupted)[:, 2].mean())
    for _, row in df[df["exact"].notna()].iterrows():
        f = int(row["feature"])

        def put(act, hook, f=f):
            act = act.clone()
            act[..., f] = src[..., f]
            return act

        with torch.no_grad():
            v = float(model.run_with_hooks(corrupted, fwd_hooks=[(hook, put)])[:, 2].mean())
        assert abs(v - base - row["exact"]) <= 1e-10
    # gradient x activation for the predicted class
    attr = feature_attribution(model, clean, target=[1, 4])
    store.clear()
    xg = clean.clone().requires_grad_(True)
    out = model.run_with_hooks(xg, fwd_hooks=[(hook, keep)])
    (out[0, 1] + out[1, 4]).backward()
    assert (attr - (store["a"].detach() * store["a"].grad).sum(1)).abs().max() <= 1e-10


def test_feature_caap_patches_one_feature_per_block():
    from patchlens.sae.attribution import feature_caap

    model, x = _model(), _x(2)
    sae = _sae()
    amap = feature_caap(model, x, 6, sae=sae, target=3, context="mean")
    assert amap.values.shape == (2, 4, 4) and amap.meta["feature"] == 6
    # block (r=1, c=2) by hand: the image's feature 6 at that patch, written into the context
    model.add_sae(sae, use_error_term=True)
    hook = "blocks.1.hook_resid_post.hook_sae_acts_post"
    with torch.no_grad():
        _, c = model.run_with_cache(x, names_filter=hook)
    src = c[hook]
    tok = model.layout.token(1, 2)
    ctx = torch.zeros_like(x)

    def put(a, hook):
        a = a.clone()
        a[:, tok, 6] = src[:, tok, 6]
        return a

    with torch.no_grad():
        v = model.run_with_hooks(ctx, fwd_hooks=[(hook, put)])[:, 3] - model(ctx)[:, 3]
    assert (amap.values[:, 1, 2] - v).abs().max() <= 1e-10
    with pytest.raises(InputError, match="do not pass layers"):
        feature_caap(model, x, 6, layers=(0, 1))


# ---- loaders ---------------------------------------------------------------------------------
def _weights(d_in=6, d_sae=10, seed=0, jump=False):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g, dtype=D64),
         "b_enc": torch.randn(d_sae, generator=g, dtype=D64) * 0.3,
         "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=D64),
         "b_dec": torch.randn(d_in, generator=g, dtype=D64)}
    if jump:
        w["threshold"] = torch.rand(d_sae, generator=g, dtype=D64) * 0.5
    return w


def _vecs(n=9, d=6, seed=3):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D64) * 2


def _save_saelens(path, cfg, w):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def _ln(x):  # SAELens / ViT-Prisma "layer_norm": centre, divide by the unbiased std + 1e-5
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + 1e-5), mu, std


@pytest.mark.parametrize("variant", ["standard", "topk", "topk_rescale", "jumprelu",
                                     "standard_ln", "standard_norm_rescale", "no_bdec",
                                     "pre6_relu", "pre6_topk", "pre6_jumprelu_log"])
def test_saelens_checkpoint_loads_and_matches_the_formulas(tmp_path, variant):
    w = _weights(jump="jumprelu" in variant)
    meta = {"hook_name": "blocks.0.hook_resid_post", "sae_lens_version": "6.5.0",
            "model_name": "m"}
    cfg = {"architecture": "standard", "d_in": 6, "d_sae": 10, "dtype": "float64",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if variant.startswith("topk"):
        cfg.update(architecture="topk", k=3, rescale_acts_by_decoder_norm=variant.endswith("rescale"))
    if variant == "jumprelu":
        cfg["architecture"] = "jumprelu"
    if variant == "standard_ln":
        cfg["normalize_activations"] = "layer_norm"
    if variant == "standard_norm_rescale":
        cfg["normalize_activations"] = "constant_norm_rescale"
    if variant == "no_bdec":
        cfg["apply_b_dec_to_input"] = False
    if variant.startswith("pre6"):  # SAELens 5.x: everything at the top level
        cfg = {"d_in": 6, "d_sae": 10, "dtype": "float64", "device": "cpu",
               "hook_name": "blocks.0.hook_resid_post", "hook_layer": 0,
               "apply_b_dec_to_input": True, "normalize_activations": False,
               "sae_lens_training_version": "5.3.0", "activation_fn_kwargs": {},
               "activation_fn_str": "relu", "architecture": "standard"}
        if variant == "pre6_topk":
            cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 3})
        if variant == "pre6_jumprelu_log":
            cfg["architecture"] = "jumprelu"
            w["log_threshold"] = w.pop("threshold").log()
    sae = pl.sae.load(_save_saelens(tmp_path / variant, cfg, w))
    assert sae.hook_name == "blocks.0.hook_resid_post" and sae.d_sae == 10
    x = _vecs()
    # SAELens's published forward, by hand
    xn = x
    if variant == "standard_ln":
        xn, mu, std = _ln(x)
    if variant == "standard_norm_rescale":
        coeff = math.sqrt(6) / x.norm(dim=-1, keepdim=True)
        xn = x * coeff
    sae_in = xn - (w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else 0)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    dec_norm = w["W_dec"].norm(dim=-1)
    if variant == "topk_rescale":
        pre = pre * dec_norm
    if "topk" in variant:
        v, i = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    elif "jumprelu" in variant:
        thr = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
        f = pre.relu() * (pre > thr)
    else:
        f = pre.relu()
    out = (f / dec_norm if variant == "topk_rescale" else f) @ w["W_dec"] + w["b_dec"]
    if variant == "standard_ln":
        out = out * std + mu
    if variant == "standard_norm_rescale":
        out = out / coeff
    assert (sae.encode(x) - f).abs().max() <= 1e-12
    assert (sae(x) - out).abs().max() <= 1e-12
    if cfg.get("normalize_activations", "none") in ("none", False):
        assert (sae.decode(f) - out).abs().max() <= 1e-12
    assert (f != 0).any() and (f == 0).any()


def test_saelens_save_round_trip(tmp_path):
    sae = _sae("topk", d_in=6, d_sae=10, hook="blocks.0.hook_mlp_out")
    back = pl.sae.load(pl.sae.save_saelens(sae, tmp_path / "s"))
    x = _vecs()
    assert back.kind == "topk" and back.k == 7 and back.hook_name == "blocks.0.hook_mlp_out"
    assert (back(x) - sae(x)).abs().max() == 0


def _prisma_cfg(**kw):
    cfg = {"model_class_name": "HookedViT", "model_name": "open-clip:laion/x",
           "hook_point_layer": 2, "layer_subtype": "hook_resid_post",
           "hook_point_head_index": None, "context_size": 50, "architecture": "standard",
           "b_dec_init_method": "geometric_median", "expansion_factor": 2,
           "is_transcoder": False, "_device": "cpu", "_dtype": "float64", "d_in": 6,
           "activation_fn_str": "relu", "activation_fn_kwargs": {}, "cls_token_only": False,
           "normalize_activations": "layer_norm", "l1_coefficient": 1e-5}
    cfg.update(kw)
    return cfg


def _prisma_formula(w, x, cfg):
    """ViT-Prisma's StandardSparseAutoencoder: normalise, subtract b_dec, encode, decode,
    un-normalise."""
    if cfg["normalize_activations"] == "layer_norm":
        xn, mu, std = _ln(x)
    else:
        xn = x
    pre = (xn - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["activation_fn_str"] == "topk":
        v, i = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        f = pre.relu()
    out = f @ w["W_dec"] + w["b_dec"]
    if cfg["normalize_activations"] == "layer_norm":
        out = out * std + mu
    return f, out


@pytest.mark.parametrize("variant", ["relu_ln", "topk_none", "legacy_pickled_cfg"])
def test_prisma_checkpoint_loads_and_matches_the_formulas(tmp_path, variant):
    w = {k: v.to(torch.float32).to(D64) for k, v in _weights(d_sae=12).items()}
    cfg = _prisma_cfg()
    if variant == "topk_none":
        cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 4},
                   normalize_activations="none")
    folder = tmp_path / variant
    folder.mkdir()
    if variant == "legacy_pickled_cfg":
        # save_model's legacy layout: {"cfg": VisionModelSAERunnerConfig, "state_dict": ...},
        # pickled by class name; the class is faked here and gone when loading
        mod = types.ModuleType("vit_prisma.sae.config")

        @dataclass
        class VisionModelSAERunnerConfig:
            d_in: int
            expansion_factor: int
            hook_point_layer: int
            layer_subtype: str
            activation_fn_str: str
            activation_fn_kwargs: dict
            normalize_activations: str
            architecture: str

        VisionModelSAERunnerConfig.__module__ = "vit_prisma.sae.config"
        VisionModelSAERunnerConfig.__qualname__ = "VisionModelSAERunnerConfig"
        mod.VisionModelSAERunnerConfig = VisionModelSAERunnerConfig
        for name in ("vit_prisma", "vit_prisma.sae"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["vit_prisma.sae.config"] = mod
        try:
            obj = VisionModelSAERunnerConfig(6, 2, 2, "hook_resid_post", "relu", {}, "layer_norm",
                                             "standard")
            torch.save({"cfg": obj, "state_dict": w}, folder / "n_images_1000.pt")
        finally:
            for name in ("vit_prisma", "vit_prisma.sae", "vit_prisma.sae.config"):
                del sys.modules[name]
        sae = pl.sae.load(folder / "n_images_1000.pt")
    else:
        (folder / "config.json").write_text(json.dumps(cfg))
        torch.save(w, folder / "weights.pt")
        sae = pl.sae.load(folder)
    assert sae.hook_name == "blocks.2.hook_resid_post" and sae.d_sae == 12
    x = _vecs()
    f, out = _prisma_formula(w, x, cfg)
    assert (sae.encode(x) - f).abs().max() <= 1e-12
    assert (sae(x) - out).abs().max() <= 1e-12


def test_state_dict_layouts_match_their_formulas():
    w = _weights()
    x = _vecs()
    # SAELens names
    sae = pl.sae.load(dict(w), kind="relu", hook_name="blocks.0.hook_resid_pre")
    f = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    assert (sae.encode(x) - f).abs().max() <= 1e-12
    assert (sae.decode(f) - (f @ w["W_dec"] + w["b_dec"])).abs().max() <= 1e-12
    # nn.Linear names: f = relu(enc(x)), x_hat = dec(f)
    lin = {"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
           "decoder.weight": w["W_dec"].T, "decoder.bias": w["b_dec"]}
    sae = pl.sae.from_state_dict(lin, "topk", k=2)
    pre = x @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(2, -1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert (sae.encode(x) - f).abs().max() <= 1e-12
    assert (sae(x) - (f @ w["W_dec"] + w["b_dec"])).abs().max() <= 1e-12
    # OpenAI sparse_autoencoder: encoder(x - pre_bias) + latent_bias; decoder(f) + pre_bias
    oa = {"encoder.weight": w["W_enc"].T, "latent_bias": w["b_enc"],
          "decoder.weight": w["W_dec"].T, "pre_bias": w["b_dec"]}
    sae = pl.sae.from_state_dict(oa, "relu")
    f = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    assert (sae(x) - (f @ w["W_dec"] + w["b_dec"])).abs().max() <= 1e-12


def test_loaders_refuse_bad_checkpoints(tmp_path):
    w = _weights()
    with pytest.raises(InputError, match="cfg.json is missing"):
        pl.sae.load_saelens(tmp_path)
    with pytest.raises(InputError, match="neither a zoo SAE"):
        pl.sae.load("no-such-sae")
    cfg = {"architecture": "gated", "d_in": 6, "d_sae": 10, "metadata": {"sae_lens_version": "6.1"}}
    with pytest.raises(InputError, match="'gated' is not supported"):
        pl.sae.load(_save_saelens(tmp_path / "g", cfg, w))
    cfg = {"architecture": "standard", "d_in": 6, "d_sae": 12,
           "metadata": {"sae_lens_version": "6.1"}}
    with pytest.raises(InputError, match="d_sae=12 but the weights have d_sae=10"):
        pl.sae.load(_save_saelens(tmp_path / "s", cfg, w))
    with pytest.raises(InputError, match="lack b_dec"):
        pl.sae.from_state_dict({k: v for k, v in w.items() if k != "b_dec"})
    with pytest.raises(InputError, match="Unexpected SAE weights"):
        pl.sae.from_state_dict({**w, "junk": torch.zeros(1)})
    bad = dict(w)
    bad["W_dec"] = bad["W_dec"].clone()
    bad["W_dec"][0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        pl.sae.from_state_dict(bad)
    with pytest.raises(InputError, match="shapes do not fit"):
        pl.sae.from_state_dict({**w, "W_dec": torch.zeros(3, 3, dtype=D64)})
    with pytest.raises(InputError, match="needs k"):
        SAE(6, 10, "topk")
    with pytest.raises(InputError, match="kind must be"):
        SAE(6, 10, "gated")
    folder = tmp_path / "p"
    folder.mkdir()
    torch.save(w, folder / "weights.pt")
    with pytest.raises(InputError, match="config.json"):
        pl.sae.load(folder)


# ---- training ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_trained():
    model = _model(torch.float32)
    imgs = _x(48, seed=11, dtype=torch.float32)
    sae = pl.sae.train(model, "blocks.1.hook_resid_post", imgs, d_sae=64, kind="topk", k=6,
                       steps=60, batch_size=256, refill_images=16, chunk_images=16,
                       eval_images=_x(8, seed=12, dtype=torch.float32), progress=False)
    return model, imgs, sae


def test_training_a_tiny_topk_sae(tiny_trained):
    model, imgs, sae = tiny_trained
    q = sae.meta["quality"]
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.d_sae == 64
    start = pl.sae.train(model, "blocks.1.hook_resid_post", imgs, d_sae=64, kind="topk", k=6,
                         steps=1, batch_size=256, refill_images=16, chunk_images=16,
                         eval_images=_x(8, seed=12, dtype=torch.float32), progress=False)
    assert q["l0"] <= 6 and q["fve"] > start.meta["quality"]["fve"] + 0.1
    assert set(q) >= {"mse", "fve", "l0", "dead", "dead_fraction", "delta_loss",
                      "delta_accuracy", "loss_recovered"}
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64) / sae.meta["training"]["input_scale"],
                          atol=1e-4)  # unit decoder rows, scale folded in


def test_training_resumes_exactly(tmp_path):
    model = _model(torch.float32)
    imgs = _x(32, seed=11, dtype=torch.float32)
    kw = dict(d_sae=32, kind="relu", l1=0.5, batch_size=128, refill_images=16, chunk_images=16,
              progress=False, checkpoint_every=1)
    full = pl.sae.train(model, "blocks.0.hook_mlp_out", imgs, steps=20, **kw)
    ck = tmp_path / "ck.pt"

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def flaky(i):  # an image source that fails partway, like an interrupted job
        calls["n"] += 1
        if calls["n"] == 4:
            raise Stop
        return imgs[torch.randperm(32, generator=torch.Generator().manual_seed(i))[:16]]

    def steady(i):
        return imgs[torch.randperm(32, generator=torch.Generator().manual_seed(i))[:16]]

    a = pl.sae.train(model, "blocks.0.hook_mlp_out", steady, steps=20, **kw)
    with pytest.raises(Stop):
        pl.sae.train(model, "blocks.0.hook_mlp_out", flaky, steps=20, checkpoint=ck, **kw)
    assert ck.exists()
    b = pl.sae.train(model, "blocks.0.hook_mlp_out", steady, steps=20, checkpoint=ck, **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert full.d_sae == 32
    with pytest.raises(InputError, match="other arguments"):
        pl.sae.train(model, "blocks.0.hook_mlp_out", steady, steps=21, checkpoint=ck, **kw)


def test_training_refuses_bad_arguments():
    model = _model(torch.float32)
    imgs = _x(4, dtype=torch.float32)
    with pytest.raises(InputError, match="needs k"):
        pl.sae.train(model, "blocks.0.hook_resid_post", imgs, d_sae=8, kind="topk")
    with pytest.raises(UnknownHookError):
        pl.sae.train(model, "blocks.0.hook_resid_pots", imgs, d_sae=8, k=2)
    with pytest.raises(InputError, match="steps must be"):
        pl.sae.train(model, "blocks.0.hook_resid_post", imgs, d_sae=8, k=2, steps=0)
    with pytest.raises(InputError, match="images must be"):
        pl.sae.train(model, "blocks.0.hook_resid_post", 3, d_sae=8, k=2)
    with pytest.raises(InputError, match="NaN"):
        pl.sae.train(model, "blocks.0.hook_resid_post", imgs * float("nan"), d_sae=8, k=2)


def test_quality_figures_by_hand(tiny_trained):
    model, imgs, sae = tiny_trained
    x = imgs[:6]
    q = pl.sae.evaluate(model, sae, x, labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    with torch.no_grad():
        _, c = model.run_with_cache(x, names_filter=sae.hook_name)
        v = c[sae.hook_name].reshape(-1, 32).double()
        f = sae.encode(v.float()).double()
        xh = sae(v.float()).double()
    assert abs(q["mse"] - float(((v - xh) ** 2).mean())) < 1e-6
    fve = 1 - float(((v - xh) ** 2).sum() / ((v - v.mean(0)) ** 2).sum())
    assert abs(q["fve"] - fve) < 1e-6
    assert abs(q["l0"] - float((f != 0).sum(-1).double().mean())) < 1e-9
    assert q["dead"] == int(((f != 0).sum(0) == 0).sum())
    with torch.no_grad():
        model.add_sae(sae)
        lg_s = model(x)
        model.reset_saes()
        lg = model(x)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert abs(q["delta_loss"] - float(F.cross_entropy(lg_s, y) - F.cross_entropy(lg, y))) < 1e-5


# ---- looking at features ---------------------------------------------------------------------
def test_feature_table_and_view(tiny_trained):
    from patchlens.sae.features import feature_view, features

    model, imgs, sae = tiny_trained
    x = imgs[:6]
    df = features(model, x, sae=sae)
    assert len(df) == 64 and {"frequency", "max_act", "top_token", "top_class"} <= set(df)
    with torch.no_grad():
        _, c = model.run_with_cache(x, names_filter=sae.hook_name)
        f = sae.encode(c[sae.hook_name])
    assert torch.allclose(torch.tensor(df["frequency"].values, dtype=torch.float32),
                          (f != 0).float().mean((0, 1)), atol=1e-6)
    feat = int(df["max_act"].idxmax())
    view = feature_view(model, x, feat, sae=sae, n_top=3)
    assert view.maps.shape == (3, 4, 4) and view.logit_effect.shape == (5,)
    assert abs(float(view.meta["strength"][0]) - float(f[..., feat].max())) < 1e-5
    # the exact logit effect: logits minus logits with the feature ablated, by hand
    top = view.top[view.meta["strength"] > 0]
    model.add_sae(sae, use_error_term=True)
    hook = f"{sae.hook_name}.hook_sae_acts_post"
    with torch.no_grad():
        abl = model.run_with_hooks(x[top], fwd_hooks=[(hook, lambda a, hook: a.index_fill(
            -1, torch.tensor([feat]), 0.0))])
        eff = (model(x[top]) - abl).mean(0)
    model.reset_saes()
    assert torch.allclose(view.logit_effect, eff, atol=1e-5)
    fig = view.plot()
    assert len(fig.data) >= 3 and "feature" in fig.layout.title.text
    with pytest.raises(InputError, match="out of range"):
        feature_view(model, x, 64, sae=sae)


# ---- divergence in feature space -------------------------------------------------------------
def test_sae_divergence_measures():
    from patchlens.diagnostics.sae import sae_measures

    sae = _sae(d_in=6, d_sae=10)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([1.0] * 5 + [-50.0] * 5, dtype=D64))  # 5 never fire
    natural = _vecs(200, seed=1)
    same = sae_measures(sae, _vecs(100, seed=2), natural)
    assert same["sae_dormant"] == 0 and 30 < same["sae_error_pct"] < 70
    # a vector that drives a dormant feature: along its encoder direction
    push = _vecs(100, seed=2) + 1000 * sae.W_enc[:, 7].detach()
    out = sae_measures(sae, push, natural)
    assert out["sae_dormant_rate"] == 1.0 and out["sae_dormant"] >= 1
    # off-dictionary: the decoder builds dims 0-2 only (features +-e_i); natural vectors live
    # there, a patched vector with a component along dim 4 does not
    w = torch.cat([torch.eye(6, dtype=D64)[:3], -torch.eye(6, dtype=D64)[:3]])
    dic = pl.sae.from_state_dict({"W_enc": w.T, "b_enc": torch.zeros(6, dtype=D64),
                                  "W_dec": w, "b_dec": torch.zeros(6, dtype=D64)})
    nat = _vecs(200, seed=1) * torch.tensor([1, 1, 1, 0.05, 0.05, 0.05], dtype=D64)
    held = _vecs(100, seed=2) * torch.tensor([1, 1, 1, 0.05, 0.05, 0.05], dtype=D64)
    ok = sae_measures(dic, held, nat)
    off = sae_measures(dic, held + 3 * torch.eye(6, dtype=D64)[4], nat)
    assert ok["sae_error_outlier_rate"] < 0.1 and off["sae_error_outlier_rate"] > 0.9
    assert off["sae_error"] > 10 * ok["sae_error"]


def test_diagnose_reports_sae_columns():
    from patchlens.diagnostics import Reference, diagnose

    model = _model(torch.float32)
    nat = _x(60, seed=20, dtype=torch.float32)
    hook = "blocks.1.hook_resid_post"
    ref = Reference.fit(model, nat, [hook], max_samples=500, progress=False)
    sae = _sae(dtype=torch.float32)
    target = _x(4, seed=21, dtype=torch.float32)
    src = _x(4, seed=22, dtype=torch.float32)
    v = [pl.Variant([(pl.Site(hook), pl.Interchange(src))], "swap"),
         pl.Variant([(pl.Site(hook), pl.Scale(30.0))], "x30")]
    rep = diagnose(model, target, v, ref, sae=sae, ot=False, behaviour=False)
    df = rep.to_pandas()
    assert {"sae_dormant", "sae_dormant_rate", "sae_error", "sae_error_pct"} <= set(df)
    # the columns are sae_measures of the patched vectors (here: the source's, all 256 kept)
    from patchlens.diagnostics.sae import sae_measures

    with torch.no_grad():
        _, c = model.run_with_cache(src, names_filter=hook)
    want = sae_measures(sae, c[hook][:, 1:].reshape(-1, 32), ref.natural(hook, "patches"))
    row = df[(df.label == "swap") & (df["class"] == "patches")].iloc[0]
    for k, val in want.items():
        assert abs(row[k] - val) < 1e-6, k
    with pytest.raises(InputError, match="no variant patches"):
        diagnose(model, target, v, ref, sae=_sae(hook="blocks.0.hook_resid_post",
                                                 dtype=torch.float32), ot=False)



def test_report_section_ranks_features_by_attribution(tmp_path):
    from patchlens.report import HtmlReport
    from patchlens.sae.report import sae_section

    model = _model(torch.float32)
    sae = _sae(dtype=torch.float32)
    x = _x(4, seed=23, dtype=torch.float32)
    rep = HtmlReport("t")
    out = sae_section(rep, model, x, sae, n_features=1, n_table=5)
    # the ranking is gradient x activation by hand: SAE spliced with its error term, the logit of
    # each image's predicted class, summed over tokens, mean over images
    with model.saes(sae, use_error_term=True):
        name = "blocks.1.hook_resid_post.hook_sae_acts_post"
        acts = {}

        def keep(a, hook):
            a.retain_grad()
            acts["a"] = a
            return a

        logits = model.run_with_hooks(x, fwd_hooks=[(name, keep)])
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        by_hand = (acts["a"] * acts["a"].grad).sum(1).mean(0).detach()
    top = int(by_hand.abs().argmax())
    assert out["top_features"][0]["feature"] == top
    assert abs(out["top_features"][0]["attribution"] - float(by_hand[top])) < 1e-4
    assert set(out["quality"]) >= {"fve", "l0", "delta_loss"}
    html = rep.save(tmp_path / "r.html").read_text()
    assert "Sparse-autoencoder features at blocks.1.hook_resid_post" in html
    _no_stray_hooks(model)


# ---- zoo ---------------------------------------------------------------------------------------
def test_zoo_saes_load_with_their_figures():
    names = [e.name for e in pl.sae.zoo_saes()]
    assert names == ["clutter-digits-shortcut-vit.resid_pre.0", "clutter-digits-vit.resid_post.2",
                     "clutter-digits-vit.resid_post.4"]
    for n in names:
        sae = pl.sae.load(n)
        rec = pl.sae.zoo_sae_info(n)
        assert sae.hook_name == rec["hook"] and sae.d_sae == 512 and sae.kind == "topk"
        assert rec["quality"]["fve"] > 0.7 and rec["quality"]["dead_fraction"] < 0.2
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    from patchlens.zoo.clutter_digits import generate

    x = model.preprocess(generate(16, split="test", seed=1234).images)
    ref = model(x)
    model.add_sae(pl.sae.load("clutter-digits-vit.resid_post.2"), use_error_term=True)
    assert (model(x) - ref).abs().max() < 1e-4


def test_zoo_shortcut_sae_finds_the_marker():
    """Ranked by attribution to the predicted class on conflict images (never told where the
    marker is), the shortcut SAE's top features fire on the marker patch, and ablating each
    image's top features moves the predictions from the marker's label to the digit's."""
    from patchlens.sae.shortcut import marker_features

    model = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit")
    sae = pl.sae.load("clutter-digits-shortcut-vit.resid_pre.0")
    out = marker_features(model, sae, n=48)
    assert out["follows_marker"] > 0.95 and out["correct"] < 0.05
    assert out["top1_fires_on_marker"] > 0.75  # the top feature is active on the marker patch
    after = out["ablate_top3"]
    assert after["follows_marker"] < 0.5 * out["follows_marker"]
    assert after["correct"] > out["correct"] + 0.05
    assert after["logit_gap"] < 0.5 * out["logit_gap"]
