"""TransformerLens parity: weight views with TransformerLens's shapes, and every ActivationCache
method a TransformerLens user calls summing exactly (float64) to the residual stream and to the
logits, on every pooling / norm / head layout a ViT can have."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_
from torch import nn
from transformer_lens import FactoredMatrix

from patchlens import HookedViT, InputError, ViTConfig
from patchlens.model.cache import ViTActivationCache

BASE = dict(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=48, image_size=(32, 32),
            patch_size=(8, 8), n_classes=5)
LAYOUTS = {
    "token": {},
    "avg_post_pool_layerscale_registers": dict(pooling="avg", final_norm="post_pool",
                                               layer_scale=True, n_registers=2, n_pos_prefix=1),
    "clip_pre_norm_avg": dict(pre_norm=True, class_token=False, pooling="avg", patch_bias=False,
                              n_pos_prefix=0),
    "distilled": dict(distilled=True),
    "token_avg": dict(pooling="token_avg"),
    "swiglu_qknorm_layerscale": dict(mlp_kind="swiglu", qk_norm=True, layer_scale=True),
    "no_final_norm": dict(final_norm="none"),
}
TOL = 1e-10


def build(**kw) -> HookedViT:
    torch.manual_seed(0)
    return perturb_(HookedViT(ViTConfig(**{**BASE, **kw})), std=0.2).double().eval()


def zeroshot_model() -> HookedViT:
    torch.manual_seed(0)
    m = HookedViT(ViTConfig(**BASE, pre_norm=True, final_norm="post_pool"))
    m.set_output_head(nn.Linear(16, 4), {"embed_dim": 16, "image_proj": True,
                                         "class_names": ["ant", "bee", "cat", "dog"]},
                      image_proj=nn.Linear(32, 16, bias=False))
    return perturb_(m, std=0.2).double().eval()


def run(model, n=3):
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.run_with_cache(x)


def err(a, b) -> float:
    return (a - b).abs().max().item()


def logit_of(logits, classes):
    if isinstance(classes, int):
        return logits[:, classes]
    return logits.gather(1, classes[:, None])[:, 0]


@pytest.fixture(scope="module", params=list(LAYOUTS) + ["zeroshot"])
def layout_run(request):
    model = zeroshot_model() if request.param == "zeroshot" else build(**LAYOUTS[request.param])
    logits, cache = run(model)
    return request.param, model, logits, cache


# ---- decompositions sum to the stream ----------------------------------------------------------
def test_decompositions_sum_to_the_residual_stream(layout_run):
    _, model, _, cache = layout_run
    assert isinstance(cache, ViTActivationCache)
    n = model.cfg.n_layers
    final = cache["resid_post", n - 1]
    for layer, mlp_input, target in [(None, False, final), (1, False, cache["resid_pre", 1]),
                                     (1, True, cache["resid_mid", 1]),
                                     (0, False, cache["resid_pre", 0])]:
        kw = dict(layer=layer, mlp_input=mlp_input)
        assert err(cache.decompose_resid(**kw).sum(0), target) < TOL
        for expand in (True, False):
            full = cache.get_full_resid_decomposition(expand_neurons=expand, **kw)
            assert err(full.sum(0), target) < TOL
        heads = cache.stack_head_results(-1 if layer is None else layer + int(mlp_input),
                                         incl_remainder=True)
        if not mlp_input:
            assert err(heads.sum(0), target) < TOL
        lay = n if layer is None else layer
        neurons = cache.stack_neuron_results(lay, incl_remainder=True, mlp_input=mlp_input)
        assert err(neurons.sum(0), target) < TOL
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert acc.shape[0] == n + 1 and labels[-1] == "final_post" and err(acc[-1], final) == 0


def test_labels_follow_transformerlens(layout_run):
    _, model, _, cache = layout_run
    n, h, d_mlp = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    embeds = ["ln_pre"] if model.cfg.pre_norm else ["embed", "pos_embed"]
    assert labels == ([f"L{l}H{j}" for l in range(n) for j in range(h)]
                      + [f"L{l}N{i}" for l in range(n) for i in range(d_mlp)] + embeds + ["bias"])
    assert stack.shape == (len(labels), 3, model.cfg.n_ctx, model.cfg.d_model)
    _, labels = cache.decompose_resid(return_labels=True)
    assert labels == embeds + [f"{l}_{k}_out" for l in range(n) for k in ("attn", "mlp")]


def test_head_and_neuron_results_are_residual_contributions(layout_run):
    """Heads of a layer plus b_O (LayerScale applied) give attn_out; neurons plus b_out give
    mlp_out."""
    _, model, _, cache = layout_run
    h, d_mlp = model.cfg.n_heads, model.cfg.d_mlp
    heads = cache.stack_head_results()
    neurons = cache.stack_neuron_results(-1)
    for layer, block in enumerate(model.blocks):
        g1 = block.ls1.gamma if block.ls1 is not None else 1
        g2 = block.ls2.gamma if block.ls2 is not None else 1
        attn = heads[layer * h:(layer + 1) * h].sum(0) + block.attn.b_O * g1
        assert err(attn, cache["attn_out", layer]) < TOL
        mlp = neurons[layer * d_mlp:(layer + 1) * d_mlp].sum(0) + block.mlp.b_out * g2
        assert err(mlp, cache["mlp_out", layer]) < TOL
    # computing from hook_z or reading a cached hook_result gives the same
    with model.options(use_attn_result=True), torch.no_grad():
        _, with_result = model.run_with_cache(torch.randn(3, 3, 32, 32, dtype=torch.float64,
                                                          generator=torch.Generator().manual_seed(1)))
    assert err(with_result.stack_head_results(), heads) < TOL


def test_apply_ln_and_projection_paths_agree(layout_run):
    name, model, _, cache = layout_run
    if model.cfg.final_norm == "none":
        return
    final = cache["resid_post", -1]
    centred = final - final.mean(-1, keepdim=True)
    scale = cache["ln_final.hook_scale"]
    if model.cfg.final_norm == "post_pool":
        scale = scale[:, None]
    ln = cache.apply_ln_to_stack(cache.decompose_resid(), -1)
    assert err(ln.sum(0), centred / scale) < TOL
    p = torch.randn(model.cfg.d_model, 3, dtype=torch.float64)
    for kw in (dict(apply_ln=True), dict(apply_ln=False)):
        folded = cache.get_full_resid_decomposition(project_output_onto=p, **kw)
        plain = cache.get_full_resid_decomposition(**kw) @ p
        assert err(folded, plain) < TOL
        one = cache.stack_neuron_results(2, project_output_onto=p[:, 0], incl_remainder=True,
                                         **kw)
        assert err(one, cache.stack_neuron_results(2, incl_remainder=True, **kw) @ p[:, 0]) < TOL
    # block inputs: ln1 / ln2 scales
    mid = cache.decompose_resid(1, mlp_input=True, apply_ln=True).sum(0)
    r = cache["resid_mid", 1]
    assert err(mid, (r - r.mean(-1, keepdim=True)) / cache["blocks.1.ln2.hook_scale"]) < TOL
    # pos_slice: the stack and the scale are sliced together
    sliced = cache.decompose_resid(apply_ln=True, pos_slice=2)
    assert err(sliced, ln[:, :, 2]) < TOL


# ---- direct logit attribution sums to the logits -------------------------------------------------
def test_logit_attrs_sum_exactly_to_the_logits(layout_run):
    name, model, logits, cache = layout_run
    y = torch.tensor([1, 3, 0])
    stacks = {
        "decompose_resid": cache.decompose_resid(),
        "full": cache.get_full_resid_decomposition(),
        "full_mlp": cache.get_full_resid_decomposition(expand_neurons=False),
        "heads+rest": cache.stack_head_results(incl_remainder=True),
        "neurons+rest": cache.stack_neuron_results(-1, incl_remainder=True),
        "accumulated_final": cache.accumulated_resid()[-1:],
    }
    for stack in stacks.values():
        for classes in (2, y):
            attrs = cache.logit_attrs(stack, classes, pooled=True)
            assert attrs.shape == (stack.shape[0], 3)
            total = attrs.sum(0) + cache.logit_offset(classes)
            assert err(total, logit_of(logits, classes)) < TOL
        diff = cache.logit_attrs(stack, y, incorrect_tokens=2, pooled=True).sum(0)
        assert err(diff + cache.logit_offset(y, 2), logit_of(logits, y) - logits[:, 2]) < TOL


def test_transformerlens_style_logit_attrs(layout_run):
    """pooled=False: each token read as if the head read it alone, [components, batch, pos];
    the logit is at the class token (token pooling) or the mean over patches (avg)."""
    name, model, logits, cache = layout_run
    cfg = model.cfg
    y = torch.tensor([1, 3, 0])
    stack = cache.get_full_resid_decomposition()
    if cfg.distilled or cfg.pooling == "token_avg":
        with pytest.raises(InputError, match="pooled=True"):
            cache.logit_attrs(stack, y)
        with pytest.raises(InputError, match="pooled=True"):
            model.tokens_to_residual_directions(y)
        return
    attrs = cache.logit_attrs(stack, y)
    assert attrs.shape == stack.shape[:3]
    read = attrs[:, :, 0] if cfg.pooling == "token" else attrs[:, :, cfg.n_prefix:].mean(-1)
    assert err(read.sum(0) + cache.logit_offset(y), logit_of(logits, y)) < TOL
    # a stack sliced at one position, with pos_slice for the scale (TransformerLens usage)
    if cfg.pooling == "token":
        cls_stack = cache.get_full_resid_decomposition(pos_slice=0)
        cls_attrs = cache.logit_attrs(cls_stack, y, pos_slice=0)
        assert err(cls_attrs, attrs[:, :, 0]) < TOL
    if cfg.zeroshot is None:
        d = model.tokens_to_residual_directions(y)
        w = model.ln_final.w if model.ln_final is not None else 1
        assert d.shape == (3, cfg.d_model) and err(d, model.W_U[:, y].T * w) == 0
        assert model.tokens_to_residual_directions(2).shape == (cfg.d_model,)


def test_zeroshot_class_names_and_refusals():
    model = zeroshot_model()
    logits, cache = run(model)
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, "bee", pooled=True)
    assert err(attrs.sum(0) + cache.logit_offset("bee"), logits[:, 1]) < TOL
    with pytest.raises(InputError, match="Unknown class name 'cow'"):
        cache.logit_attrs(stack, "cow")
    with pytest.raises(InputError, match="embedding norm"):
        model.tokens_to_residual_directions(1)


def test_logit_attribution_refusals():
    cache = run(build(pooling="map", class_token=False))[1]
    with pytest.raises(InputError, match="attention-pooling"):
        cache.logit_attrs(cache.decompose_resid(), 1)
    headless = build(n_classes=0)
    with pytest.raises(InputError, match="headless"):
        headless.tokens_to_residual_directions(0)
    model = build()
    _, cache = run(model)
    stack = cache.decompose_resid()
    with pytest.raises(InputError, match="2 classes for a cache of 3 images"):
        cache.logit_attrs(stack, torch.tensor([1, 2]))
    with pytest.raises(InputError, match="out of range"):
        cache.logit_attrs(stack, 9)
    with pytest.raises(InputError, match="pos_slice"):
        cache.logit_attrs(stack[:, :, :1], 1, pos_slice=0, pooled=True)
    with pytest.raises(InputError, match="layer must be in 0..3"):
        cache.decompose_resid(7)
    with torch.no_grad():
        _, partial = model.run_with_cache(torch.randn(1, 3, 32, 32, dtype=torch.float64),
                                          names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(InputError, match="names_filter"):
        partial.get_full_resid_decomposition()


# ---- weight views ----------------------------------------------------------------------------------
def test_weight_views_have_transformerlens_shapes():
    model = build(mlp_kind="swiglu", layer_scale=True, qk_norm=True)
    cfg = model.cfg
    n, h, d, dh, dm = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    shapes = {"W_Q": (n, h, d, dh), "W_K": (n, h, d, dh), "W_V": (n, h, d, dh),
              "W_O": (n, h, dh, d), "b_Q": (n, h, dh), "b_K": (n, h, dh), "b_V": (n, h, dh),
              "b_O": (n, d), "W_in": (n, d, dm), "b_in": (n, dm), "W_gate": (n, d, dm),
              "W_out": (n, dm, d), "b_out": (n, d), "W_E": (3 * 8 * 8, d), "b_E": (d,),
              "W_pos": (cfg.n_ctx, d), "W_U": (d, 5), "b_U": (5,)}
    for name, shape in shapes.items():
        assert tuple(getattr(model, name).shape) == shape, name
    for layer, block in enumerate(model.blocks):
        assert torch.equal(model.W_Q[layer], block.attn.W_Q)
        assert torch.equal(model.W_out[layer], block.mlp.W_out)
    assert cfg.d_vocab_out == 5
    assert isinstance(model.OV, FactoredMatrix) and model.OV.shape == (n, h, d, d)
    ov = model.blocks[1].attn.OV
    assert isinstance(ov, FactoredMatrix) and err(ov.AB, model.W_V[1] @ model.W_O[1]) < TOL
    with pytest.raises(InputError, match="qk_norm"):
        model.QK  # noqa: B018
    plain = build()
    assert err(plain.QK.AB, plain.W_Q @ plain.W_K.transpose(-1, -2)) < TOL
    assert plain.W_gate is None


def test_weight_views_reproduce_the_activations():
    """W_E / b_E on a patch's pixels give its token embedding; W_pos is hook_pos_embed; the
    gated MLP's W_gate feeds hook_pre and W_in hook_pre_linear (TransformerLens's roles)."""
    model = build(mlp_kind="swiglu", n_pos_prefix=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    patch = x[:, :, 8:16, 16:24].reshape(2, -1)  # row 1, col 2 of the 4x4 grid
    token = model.layout.token(1, 2)
    assert err(patch @ model.W_E + model.b_E, cache["hook_embed"][:, token]) < TOL
    assert err(model.W_pos, cache["hook_pos_embed"][0]) == 0
    ln2 = cache["blocks.1.ln2.hook_normalized"]
    mlp = model.blocks[1].mlp
    assert err(ln2 @ mlp.W_gate + mlp.b_gate, cache["blocks.1.mlp.hook_pre"]) < TOL
    assert err(ln2 @ mlp.W_in + mlp.b_in, cache["blocks.1.mlp.hook_pre_linear"]) < TOL
    with pytest.raises(InputError, match="position embedding"):
        build(pos_embed=False).W_pos  # noqa: B018


# ---- TransformerLens habits that patchlens refuses with advice -------------------------------------
def test_transformerlens_habits_are_refused_with_advice():
    import patchlens as pl
    from patchlens import Site

    model = build()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)

    def tl_hook(act, hook):
        return act

    with pytest.raises(InputError, match=r"lambda act, hook, site: tl_hook\(act, hook\)"):
        pl.patch(model, x, [(Site("resid_pre", layers=0), tl_hook)])
    with pytest.raises(InputError, match="labels"):
        model(x, return_type="loss")
    rec = pl.metrics.recovery(pl.metrics.logit(1))
    with pytest.raises(InputError, match="cannot score one run"):
        rec(model(x))
    wrong = pl.metrics.logit(torch.tensor([0, 1]))          # 2 classes for 3 images
    with pytest.raises(InputError, match="2 per-example classes for a batch of 3"):
        pl.activation_patching(model, x, x.flip(0), wrong, per="layer")
    with pytest.raises(InputError, match="2 per-example classes for a batch of 3"):
        pl.Recipe([(Site("resid_pre", layers=0), pl.Zero())]).sweep(model, x, wrong, layers=[0])
    assert all(not h.fwd_hooks for h in model.hook_dict.values())
