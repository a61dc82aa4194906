"""Path patching against a naive three-pass implementation (plain run_with_hooks)."""

from __future__ import annotations

import pytest
import torch
from conftest import timm_vit

import patchlens as pl
from patchlens import InputError
from patchlens.recipes.path import Node, all_heads, all_heads_and_mlps, path_patching


@pytest.fixture(scope="module")
def model():
    return pl.HookedViT.from_timm(timm_vit(seed=2, init_values=0.5).double())


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64))


RECEIVER_HOOK = {
    "q": "blocks.{l}.hook_q_input", "k": "blocks.{l}.hook_k_input", "v": "blocks.{l}.hook_v_input",
    "mlp_in": "blocks.{l}.ln2.hook_normalized",
}


def naive_path_patching(model, clean, corrupted, sender, receivers, metric, mlps="frozen"):
    """Three passes, one sender, all hooks written by hand."""
    n = model.cfg.n_layers
    with torch.no_grad(), model.options(use_split_qkv_input=True):
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupted)
        sender_hook = {"z": "blocks.{l}.attn.hook_z", "attn_out": "blocks.{l}.hook_attn_out",
                       "mlp_out": "blocks.{l}.hook_mlp_out", "embed": "hook_full_embed"}[sender.kind]
        sender_hook = sender_hook.format(l=sender.layer)

        def freeze(act, hook):
            act = cc[hook.name].clone()
            if hook.name == sender_hook:
                if sender.kind == "z":
                    act[:, :, sender.head] = kc[hook.name][:, :, sender.head]
                else:
                    act = kc[hook.name].clone()
            return act

        def sender_only(act, hook):
            return kc[hook.name].clone()

        hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(n)]
        if mlps == "frozen":
            hooks += [(f"blocks.{l}.hook_mlp_out", freeze) for l in range(n)]
        if sender.kind in ("attn_out", "embed") or (sender.kind == "mlp_out" and mlps != "frozen"):
            hooks.append((sender_hook, sender_only))
        names = []
        for r in receivers:
            names.append(f"blocks.{n - 1}.hook_resid_post" if r.kind == "resid_final"
                         else RECEIVER_HOOK[r.kind].format(l=r.layer))
        with model.hooks(fwd_hooks=hooks):
            _, step2 = model.run_with_cache(clean, names_filter=names)

        def make(r, name):
            def put(act, hook):
                act = act.clone()
                if r.kind in ("q", "k", "v"):
                    act[:, :, r.head] = step2[name][:, :, r.head]
                else:
                    act[:] = step2[name]
                return act
            return put

        hooks3 = [(name, make(r, name)) for r, name in zip(receivers, names)]
        logits = model.run_with_hooks(clean, fwd_hooks=hooks3)
        base = metric(model(clean))
    return metric(logits) - base


@pytest.mark.parametrize("receivers", [
    [Node("resid_final")],
    [Node("q", 2, 1)],
    [Node("k", 2, 3), Node("v", 2, 0)],
    [Node("mlp_in", 1)],
])
def test_heads_sweep_equals_naive(model, pair, receivers):
    clean, corr = pair
    metric = pl.metrics.logit_diff(0, 3)
    res = path_patching(model, clean, corr, all_heads(model), receivers, metric, progress=False)
    assert res.axes == ("layer", "head") and res.values.shape == (3, 4)
    for layer in range(3):
        for head in range(4):
            ref = naive_path_patching(model, clean, corr, Node("z", layer, head), receivers, metric)
            assert torch.allclose(res.effects_per_example[:, layer, head], ref, atol=1e-10), (layer, head)


def test_mlp_and_embed_senders_and_recompute(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(2)
    senders = [Node("embed"), Node("attn_out", 0), Node("mlp_out", 1)]
    for mlps in ("frozen", "recompute"):
        res = path_patching(model, clean, corr, senders, Node("resid_final"), metric, mlps=mlps,
                            progress=False)
        assert res.axes == ("sender",) and res.labels["sender"] == ["embed", "attn_out0", "mlp_out1"]
        for i, s in enumerate(senders):
            ref = naive_path_patching(model, clean, corr, s, [Node("resid_final")], metric, mlps=mlps)
            assert torch.allclose(res.effects_per_example[:, i], ref, atol=1e-10), (s, mlps)


def test_direct_effects_sum_for_last_layer(model, pair):
    """For the last layer's heads, the direct effect on a linear metric through the final
    residual equals the activation-patching effect of that head (nothing downstream but the
    final norm and head)."""
    clean, corr = pair
    metric = pl.metrics.logit(1)
    pp = path_patching(model, clean, corr, [Node("z", 2, h) for h in range(4)], Node("resid_final"),
                       metric, mlps="recompute", progress=False)
    ap = pl.activation_patching(model, clean, corr, metric, per="head", layers=[2],
                                direction="noising", progress=False)
    assert torch.allclose(pp.effects_per_example, ap.effects_per_example, atol=1e-10)
    assert torch.allclose(pp.per_example, ap.per_example, atol=1e-10)
    assert torch.allclose(pp.baseline, ap.baseline, atol=1e-12)


def test_separate_receivers_and_tokens(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(0)
    recv = [Node("q", 2, 0, tokens="cls"), Node("v", 2, 1)]
    sep = path_patching(model, clean, corr, all_heads(model), recv, metric, combine="separate",
                        progress=False)
    assert sep.axes == ("layer", "head", "receiver")
    one = path_patching(model, clean, corr, all_heads(model), recv[1], metric, progress=False)
    assert torch.allclose(sep.per_example[..., 1], one.per_example, atol=1e-12)
    # senders at or after the receivers' layer have no path: exactly zero
    assert (sep.effects[2] == 0).all() and torch.equal(sep.values[2], sep.baseline.mean().expand(4, 2))
    fig = one.plot()
    assert fig.data[0].z.shape == (3, 4)


def test_split_inputs_only_during_path_patching(model, pair):
    clean, corr = pair
    path_patching(model, clean, corr, all_heads_and_mlps(model)[:3], Node("q", 1, 0),
                  pl.metrics.logit(0), progress=False)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result
    assert not any(h.fwd_hooks for h in model.hook_dict.values())


def test_bad_nodes(model, pair):
    clean, corr = pair
    m = pl.metrics.logit(0)
    with pytest.raises(InputError, match="needs a head"):
        Node("z", 1)
    with pytest.raises(InputError, match="Unknown node kind"):
        Node("mlp", 1)
    with pytest.raises(InputError, match="cannot be a receiver"):
        path_patching(model, clean, corr, all_heads(model), Node("z", 1, 1), m)
    with pytest.raises(InputError, match="cannot be a sender"):
        path_patching(model, clean, corr, [Node("q", 1, 1)], Node("resid_final"), m)
    with pytest.raises(InputError, match="out of range"):
        path_patching(model, clean, corr, [Node("z", 7, 1)], Node("resid_final"), m)
    with pytest.raises(InputError, match="at least one"):
        path_patching(model, clean, corr, [], Node("resid_final"), m)
    with pytest.raises(InputError, match="same shape"):
        path_patching(model, clean, corr[:1], all_heads(model), Node("resid_final"), m)
