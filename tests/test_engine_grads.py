"""Gradient capture in the engine (and `run_with_cache(incl_bwd=True)`), checked against plain
autograd in float64 and against TransformerLens's own incl_bwd."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedRootModule

import patchlens as pl
from patchlens import HookedViT, InputError, ViTConfig
from patchlens.patching.engine import Variant, capture, capture_grads, run_variants

HOOKS = ["hook_full_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale",
         "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post",
         "blocks.1.hook_resid_post", "hook_pooled"]


def _model(dtype=torch.float64, **kw) -> HookedViT:
    torch.manual_seed(0)
    base = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=48, image_size=(32, 32),
                patch_size=(8, 8), n_classes=5)
    base.update(kw)
    return HookedViT(ViTConfig(**base)).eval().to(dtype)


def _manual_grads(model, x, hooks, metric, edit=None):
    """The naive reference: retain_grad on each hook's output, backward of the summed metric."""
    kept = {}

    def keep(act, hook):
        if edit is not None and hook.name in edit:
            act = edit[hook.name](act)
        act.retain_grad()
        kept[hook.name] = act
        return act

    names = sorted(set(hooks) | set(edit or ()))
    with torch.enable_grad(), model.hooks(fwd_hooks=[(h, keep) for h in names]):
        xr = x.clone().requires_grad_(True)
        values = metric(model(xr))
        values.sum().backward()
    model.zero_grad(set_to_none=True)
    return values.detach(), {h: kept[h].detach() for h in hooks}, {h: kept[h].grad for h in hooks}


def test_capture_grads_equals_autograd_float64():
    model = _model()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    metric = pl.metrics.logit_diff(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0]))
    run = capture_grads(model, x, HOOKS, metric)
    values, acts, grads = _manual_grads(model, x, HOOKS, metric)
    assert torch.allclose(run.values, values, atol=1e-12)
    for h in HOOKS:
        assert run.acts[h].dtype == torch.float64
        assert torch.allclose(run.acts[h], acts[h], atol=1e-12), h
        assert torch.allclose(run.grads[h], grads[h], atol=1e-10, rtol=1e-9), h
    assert all(p.grad is None for p in model.parameters())
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_capture_grads_with_frozen_parameters():
    model = _model().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    metric = pl.metrics.logit(1)
    run = capture_grads(model, x, ["blocks.0.ln1.hook_scale", "blocks.1.hook_resid_mid"], metric)
    model.requires_grad_(True)
    _, _, grads = _manual_grads(model, x, ["blocks.0.ln1.hook_scale",
                                           "blocks.1.hook_resid_mid"], metric)
    for h, g in grads.items():
        assert torch.allclose(run.grads[h], g, atol=1e-10), h


def test_patched_variant_gradients_equal_a_manual_patched_run():
    model = _model()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    metric = pl.metrics.logit(3)
    variants = [Variant([(pl.Site("resid_pre", layers=1, tokens=[0, 2]), pl.Scale(0.3))], "a"),
                Variant([(pl.Site("z", layers=0, heads=1), pl.Zero())], "b")]
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.mlp.hook_pre", "hook_pooled"]
    res = run_variants(model, x, variants, metric=metric, grads=hooks)

    def scale_tokens(a):
        a = a.clone()
        a[:, [0, 2]] = a[:, [0, 2]] * 0.3
        return a

    def zero_head(a):
        a = a.clone()
        a[:, :, 1] = 0
        return a

    edits = [{"blocks.1.hook_resid_pre": scale_tokens}, {"blocks.0.attn.hook_z": zero_head}]
    for i, edit in enumerate(edits):
        values, acts, grads = _manual_grads(model, x, hooks, metric, edit)
        assert torch.allclose(res.outputs[i], values, atol=1e-12)
        for h in hooks:
            assert torch.allclose(res.captured[h][i], acts[h], atol=1e-12), (i, h)
            assert torch.allclose(res.grads[h][i], grads[h], atol=1e-10), (i, h)


def test_grads_need_a_metric_and_known_hooks():
    model = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(InputError, match="needs a metric"):
        run_variants(model, x, [Variant([], "a")], grads=["hook_pooled"])
    with pytest.raises(pl.UnknownHookError, match="hook_pooled"):
        capture_grads(model, x, ["hook_poolde"], pl.metrics.logit(0))


def test_captured_hooks_before_the_start_layer_hold_unpatched_values():
    model = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    variants = [Variant([(pl.Site("resid_pre", layers=1), pl.Zero())], "late")]
    res = run_variants(model, x, variants, capture=["blocks.0.hook_resid_post",
                                                    "blocks.1.hook_resid_post"])
    plain = capture(model, x, ["blocks.0.hook_resid_post"]).acts["blocks.0.hook_resid_post"]
    assert res.start_layers == [1]
    assert torch.allclose(res.captured["blocks.0.hook_resid_post"][0], plain, atol=1e-12)


# ---- run_with_cache(incl_bwd=True) ------------------------------------------------------------
def test_incl_bwd_with_metric_equals_transformerlens_backward():
    """TransformerLens caches d(output)/d(act) by calling output.backward(); on a model whose
    output is one number (1 class, 1 image) that is our metric=sum."""
    model = _model(n_classes=1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
    out_tl, cache_tl = HookedRootModule.run_with_cache(model, x, names_filter=names,
                                                       incl_bwd=True)
    assert any(p.grad is not None for p in model.parameters())  # TL accumulates into .grad
    model.zero_grad(set_to_none=True)
    out, cache = model.run_with_cache(x, names_filter=names, incl_bwd=True,
                                      metric=lambda o: o.sum())
    assert all(p.grad is None for p in model.parameters())  # ours does not
    assert torch.allclose(out, out_tl.detach(), atol=1e-12)
    for n in names:
        assert torch.allclose(cache[n], cache_tl[n], atol=1e-12)
        assert torch.allclose(cache[n + "_grad"], cache_tl[n + "_grad"], atol=1e-10)


def test_incl_bwd_without_metric_is_transformerlens_and_explains_non_scalar():
    model = _model(n_classes=1)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    _, cache = model.run_with_cache(x, names_filter=["hook_pooled"], incl_bwd=True)
    assert "hook_pooled_grad" in cache.cache_dict
    model.zero_grad(set_to_none=True)
    wide = _model()
    with pytest.raises(InputError, match="metric=fn"):
        wide.run_with_cache(torch.randn(2, 3, 32, 32, dtype=torch.float64), incl_bwd=True)
    with pytest.raises(InputError, match="scalar"):
        wide.run_with_cache(torch.randn(2, 3, 32, 32, dtype=torch.float64), incl_bwd=True,
                            metric=lambda o: o[:, 0])
    with pytest.raises(InputError, match="incl_bwd=True"):
        wide.run_with_cache(torch.randn(2, 3, 32, 32, dtype=torch.float64),
                            metric=lambda o: o.sum())
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in wide.hook_dict.values())


def test_run_with_cache_error_keeps_the_users_own_hooks():
    model = _model()
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda a, hook: calls.append(1))
    with pytest.raises(InputError):
        model.run_with_cache(torch.randn(2, 3, 31, 32, dtype=torch.float64))
    assert len(model.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks) == 1
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert calls == [1]
    model.reset_hooks()


def test_unknown_return_type_is_refused():
    model = _model()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(InputError, match="labels"):
        model(x, return_type="loss")
    with pytest.raises(InputError, match="return_type"):
        model(x, return_type="bogus")
