"""Interventions that read the same run's activations (`Intervention.reads`), and the opt-in
receiver inputs they patch (split q/k/v inputs, ``hook_mlp_in``)."""

from __future__ import annotations

import torch

import patchlens as pl
from patchlens import HookedViT, Site, ViTConfig
from patchlens.patching.engine import Variant, run_variants
from patchlens.patching.interventions import Intervention


def _model() -> HookedViT:
    torch.manual_seed(0)
    cfg = ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=48, image_size=(32, 32),
                    patch_size=(8, 8), n_classes=5)
    m = HookedViT(cfg).eval().double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


class AddRead(Intervention):
    """act + alpha * (the same run's activation at ``read``)."""

    def __init__(self, read: str, alpha: float):
        self.reads, self.alpha = (read,), alpha

    def values(self, act, where, source):
        live = where.live[self.reads[0]][where.rows]
        return act + self.alpha * live


def test_reads_see_the_same_run_and_unpatched_values_before_the_start():
    m = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    metric = pl.metrics.logit(1)
    read = AddRead("blocks.0.hook_mlp_out", 0.7)
    variants = [
        # starts at layer 2: the read hook (layer 0) does not run, its unpatched value is used
        Variant([(Site("blocks.2.hook_resid_pre"), read)], "late"),
        # the read hook is patched itself: the read sees the patched value
        Variant([(Site("blocks.0.hook_mlp_out"), pl.Scale(3.0)),
                 (Site("blocks.1.hook_resid_mid"), read)], "patched read"),
    ]
    got = run_variants(m, x, variants, metric=metric, batch_size=2).outputs

    def manual(patch_mlp0: float, at: str):
        seen = {}

        def mlp0(act, hook):
            act = act * patch_mlp0
            seen["a"] = act
            return act

        def add(act, hook):
            return act + 0.7 * seen["a"]

        with torch.no_grad():
            return metric(m.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_mlp_out", mlp0),
                                                         (at, add)]))

    assert torch.allclose(got[0], manual(1.0, "blocks.2.hook_resid_pre"), atol=1e-12)
    assert torch.allclose(got[1], manual(3.0, "blocks.1.hook_resid_mid"), atol=1e-12)
    assert not any(h.fwd_hooks for h in m.hook_dict.values())


def test_mlp_in_feeds_only_the_mlp():
    m = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, cache = m.run_with_cache(x)
        patched = pl.patch(m, x, [(Site("mlp_in", layers=1), pl.Zero())], return_type="resid")
        ref_mid = cache["blocks.1.hook_resid_mid"]
        mlp_of_zero = m.blocks[1].mlp(m.blocks[1].ln2(torch.zeros_like(ref_mid)))
        expected = m.blocks[2](ref_mid + mlp_of_zero)
    assert torch.allclose(patched, expected, atol=1e-12)
    assert not m.cfg.use_hook_mlp_in


def test_split_inputs_run_only_where_hooked():
    """With the opt-in flags on, blocks whose split inputs are not hooked take the fused path;
    outputs agree with the all-split computation to rounding."""
    m = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        plain = m(x)
        with m.options(use_split_qkv_input=True, use_hook_mlp_in=True, use_attn_result=True):
            lazy = m(x)
            every = [(f"blocks.{l}.hook_{k}_input", lambda a, hook: a)
                     for l in range(3) for k in "qkv"]
            every += [(f"blocks.{l}.hook_mlp_in", lambda a, hook: a) for l in range(3)]
            every += [(f"blocks.{l}.attn.hook_result", lambda a, hook: a) for l in range(3)]
            split = m.run_with_hooks(x, fwd_hooks=every)
    assert torch.equal(plain, lazy)
    assert torch.allclose(split, plain, atol=1e-12)


def test_one_hooked_split_input_equals_all_three_split():
    """Hooking only the query input splits only the queries; the keys and values read the
    shared stream. Same numbers as with all three inputs split (float64)."""
    m = _model()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def edit(act, hook):
        act = act.clone()
        act[:, :, 2] += torch.linspace(-1, 1, act.shape[-1], dtype=act.dtype)  # not a constant
        return act

    def same(act, hook):
        return act

    with torch.no_grad(), m.options(use_split_qkv_input=True):
        one = m.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_q_input", edit)])
        three = m.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_q_input", edit),
                                               ("blocks.1.hook_k_input", same),
                                               ("blocks.1.hook_v_input", same)])
        plain = m(x)
    assert torch.allclose(one, three, atol=1e-12)
    assert not torch.allclose(one, plain, atol=1e-6)
