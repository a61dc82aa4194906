"""The hook schema: every hook point declared once, axes that match the tensors, forward order,
and sites that resolve against it (no intervention can index the wrong axis)."""

from __future__ import annotations

import pytest
import torch
from conftest import timm_vit
from torch import nn
from transformer_lens.hook_points import HookPoint

import patchlens as pl
from patchlens import HookedViT, InputError, ViTConfig
from patchlens.model.hooks import OPTION_FLAGS, HookDecl, declare_hooks
from patchlens.patching.interventions import Stored

CONFIGS = {
    "plain": dict(),
    "registers_qknorm": dict(n_registers=2, qk_norm=True),
    "distilled_postpool": dict(distilled=True, final_norm="post_pool"),
    "map_prenorm_swiglu": dict(pooling="map", class_token=False, pre_norm=True,
                               mlp_kind="swiglu", layer_scale=True),
    "avg_headless": dict(pooling="avg", n_classes=0, final_norm="post_pool"),
    "token_avg": dict(pooling="token_avg"),
    # rotary attention (hook_rot_q / hook_rot_k), GLU MLP, sub-LayerNorms in attention and MLP
    "rotary_glu_subnorms": dict(rope="timm_cat", rope_ref_grid=(2, 2), n_registers=2,
                                mlp_kind="glu", act_fn="gelu", mlp_norm=True, attn_norm=True,
                                qk_norm=True),
    "dinov3_like": dict(rope="timm_dinov3", rope_rotate_half=True, rope_precision="model",
                        pos_embed=False, n_registers=4, layer_scale=True, mlp_kind="swiglu",
                        pooling="avgmax"),
    "coca_pool": dict(pooling="coca", pool_dim=24, map_n_heads=2, final_norm="post_pool",
                      pool_include_prefix=True),
    "map_prefix_heads": dict(pooling="map", map_n_heads=2, pool_include_prefix=True,
                             rope="hf_dinov3", rope_rotate_half=True),
}


def _model(name: str, dtype=torch.float32) -> HookedViT:
    torch.manual_seed(0)
    base = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=48, image_size=(32, 32),
                patch_size=(8, 8), n_classes=5)
    base.update(CONFIGS[name])
    return HookedViT(ViTConfig(**base)).eval().to(dtype)


def _zeroshot_model() -> HookedViT:
    m = _model("plain")
    m.cfg.n_classes = 0
    head = nn.Linear(12, 3, bias=True)
    m.set_output_head(head, zeroshot={"embed_dim": 12, "image_proj": True,
                                      "class_names": ["a", "b", "c"]},
                      image_proj=nn.Linear(32, 12, bias=False))
    return m


def _fire_all(model: HookedViT, x: torch.Tensor) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Run with every hook point hooked (opt-in flags on): the order in which they first fire
    and their activations."""
    order: list[str] = []
    acts: dict[str, torch.Tensor] = {}

    def rec(act, hook):
        if hook.name not in acts:
            order.append(hook.name)
            acts[hook.name] = act
        return act

    with model.options(**dict.fromkeys(OPTION_FLAGS, True)), torch.no_grad(), \
            model.hooks(fwd_hooks=[(n, rec) for n in model.hook_dict]):
        model(x)
    return order, acts


def _axis_sizes(model: HookedViT, b: int) -> dict[str, int]:
    cfg = model.cfg
    n = model.layout.n_tokens
    zs = cfg.zeroshot or {}
    return {"batch": b, "pos": n, "query_pos": n, "key_pos": n, "head": cfg.n_heads,
            "d_head": cfg.d_head, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "1": 1,
            "d_attn": cfg.n_heads * cfg.d_head,
            "d_pooled": cfg.d_pooled, "n_classes": cfg.n_classes, "latent": 1,
            "embed_dim": zs.get("embed_dim", -1)}


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["zeroshot"])
def test_every_hook_is_declared_with_axes_that_match_its_tensor(name):
    model = _zeroshot_model() if name == "zeroshot" else _model(name)
    assert set(model.hook_specs) == set(model.hook_dict)
    x = torch.randn(3, 3, 32, 32)
    order, acts = _fire_all(model, x)
    sizes = _axis_sizes(model, 3)
    # with the opt-in flags on, the schema gives the axes of that mode
    with model.options(**dict.fromkeys(OPTION_FLAGS, True)):
        specs = model.hook_specs
    for hook, act in acts.items():
        spec = specs[hook]
        assert act.ndim == len(spec.axes), (hook, spec.axes, act.shape)
        for ax, n in zip(spec.axes, act.shape):
            if ax == "d_mlp" and hook.startswith("attn_pool."):
                continue  # the attention-pool head's MLP has its own width
            assert sizes[ax] == n, (hook, ax, n)
    # hooks that never fire are exactly those the schema says need something else
    silent = set(model.hook_dict) - set(acts)
    for hook in silent:
        assert model.hook_spec(hook).note, f"{hook} did not fire and its spec does not say when"


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["zeroshot"])
def test_schema_order_is_the_forward_order(name):
    model = _zeroshot_model() if name == "zeroshot" else _model(name)
    order, _ = _fire_all(model, torch.randn(2, 3, 32, 32))
    spec_order = [h for h in model.hook_specs if h in set(order)]
    assert order == spec_order
    stages = [model.hook_spec(h).stage for h in model.hook_specs]
    assert stages == sorted(stages, key=["embed", "block", "head"].index)


def test_split_qkv_input_changes_ln1_axes():
    model = _model("plain")
    assert model.hook_spec("blocks.0.ln1.hook_normalized").axes == ("batch", "pos", "d_model")
    with model.options(use_split_qkv_input=True):
        assert model.hook_spec("blocks.0.ln1.hook_normalized").axes == \
            ("batch", "pos", "head", "d_model")
        assert model.hook_spec("blocks.0.ln1.hook_scale").axes == ("batch", "pos", "head", "1")


def test_undeclared_hook_point_is_refused():
    model = _model("plain")
    model.blocks[0].hook_extra = HookPoint()
    with pytest.raises(TypeError, match="no declared axes"):
        model.setup()


def test_a_new_hook_is_one_declaration_in_its_component():
    """The docs' example: a component declares a new hook point and everything picks it up."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            declare_hooks(self, {"hook_scaled": HookDecl("batch pos d_model", "2x the input",
                                                         alias="scaled")})

        def forward(self, x):
            return self.hook_scaled(2 * x)

    model = _model("plain")
    model.blocks[1].extra = Scaled()
    model.setup()
    spec = model.hook_spec("blocks.1.extra.hook_scaled")
    assert (spec.layer, spec.token_axis, spec.alias) == (1, 1, "scaled")
    assert model.hook_aliases["scaled"] == {1: "blocks.1.extra.hook_scaled"}
    sites = pl.Site("scaled", layers=1, tokens="cls").resolve(model)
    assert sites[0].hook == "blocks.1.extra.hook_scaled" and sites[0].tokens.tolist() == [0]


# ---- hooks without a token axis ---------------------------------------------------------------
def _interventions(model, x):
    ref = torch.randn(4, 3, 32, 32)
    return {
        "Interchange": pl.Interchange(ref[:2]), "Zero": pl.Zero(), "Mean": pl.Mean(ref),
        "Resample": pl.Resample(ref), "Noise": pl.Noise(0.1), "Scale": pl.Scale(0.5),
        "Add": pl.Add(torch.ones(model.cfg.d_pooled)),
        "Custom": pl.Custom(lambda a, hook, site: a * 0),
        "Stored": Stored({"hook_pooled": torch.zeros(2, model.cfg.d_pooled)}),
    }


@pytest.mark.parametrize("iv_name", ["Interchange", "Zero", "Mean", "Resample", "Noise", "Scale",
                                     "Add", "Custom", "Stored"])
@pytest.mark.parametrize("name", ["plain", "distilled_postpool", "zeroshot"])
def test_token_selection_at_a_hook_without_token_axis_is_refused(name, iv_name):
    model = _zeroshot_model() if name == "zeroshot" else _model(name)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    tokenless = [h for h, s in model.hook_specs.items() if s.token_axis is None]
    assert "hook_pooled" in tokenless and ("hook_normalized_embed" in tokenless) == \
        (name == "zeroshot")
    for hook in tokenless:
        for tokens in ("cls", [0], 3, pl.Rect(0, 1, 0, 1)):
            iv = _interventions(model, x)[iv_name]
            with pytest.raises(InputError, match="no token axis") as e:
                pl.patch(model, x, [(pl.Site(hook, tokens=tokens), iv)])
            assert hook in str(e.value) and "batch" in str(e.value)
        with pytest.raises(InputError, match="no head axis"):
            pl.patch(model, x, [(pl.Site(hook, heads=0), pl.Zero())])
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    assert torch.equal(model(x), before)


def test_whole_row_intervention_at_a_tokenless_hook_is_exact():
    model = _zeroshot_model().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = pl.patch(model, x, [(pl.Site("normalized_embed"), pl.Zero())])
    assert torch.allclose(out, model.head.bias.expand(2, -1), atol=1e-12)
    out = pl.patch(model, x, [(pl.Site("hook_pooled"), pl.Scale(0.0))])
    ref = model.head(torch.nn.functional.normalize(model.image_proj(
        torch.zeros(2, 32, dtype=torch.float64)), dim=-1))
    assert torch.allclose(out, ref, atol=1e-12)


def test_layers_a_hook_does_not_have():
    model = _model("plain")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match="not a per-layer hook"):
        pl.patch(model, x, [(pl.Site("pooled", layers=1), pl.Zero())])
    with pytest.raises(InputError, match="one hook at layer 1"):
        pl.patch(model, x, [(pl.Site("blocks.1.hook_resid_pre", layers=0), pl.Zero())])
    with pytest.raises(InputError, match="out of range"):
        pl.patch(model, x, [(pl.Site("resid_pre", layers=7), pl.Zero())])


def test_full_hook_name_in_activation_patching_gives_one_layer():
    model = _model("plain")
    torch.manual_seed(1)
    clean, corr = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    metric = pl.metrics.logit(0)
    res = pl.activation_patching(model, clean, corr, metric, site="blocks.1.hook_resid_pre")
    ref = pl.activation_patching(model, clean, corr, metric, site="resid_pre", layers=1)
    assert res.values.shape == ref.values.shape == (1, model.layout.n_tokens)
    assert torch.equal(res.values, ref.values)
    with pytest.raises(InputError, match="one hook at layer 1"):
        pl.activation_patching(model, clean, corr, metric, site="blocks.1.hook_resid_pre",
                               layers=[0, 1])


def test_pattern_selection_keeps_the_hooks_axis_order():
    """A custom intervention at hook_pattern sees [B, head, query, key] with the selected heads
    and query tokens, in the hook's own axis order."""
    model = _model("plain")
    x = torch.randn(2, 3, 32, 32)
    seen = {}

    def fn(a, hook, site):
        seen["shape"] = tuple(a.shape)
        return a

    pl.patch(model, x, [(pl.Site("pattern", layers=0, tokens=[0, 3, 5], heads=[1, 2]),
                         pl.Custom(fn))])
    n = model.layout.n_tokens
    assert seen["shape"] == (2, 2, 3, n)


def test_two_argument_hook_is_refused_with_advice():
    model = _model("plain")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"fn\(activation, hook, site\)"):
        pl.patch(model, x, [(pl.Site("resid_pre", layers=0), lambda act, hook: act)])


def test_hook_table_comes_from_the_schema():
    model = HookedViT.from_timm(timm_vit(reg_tokens=1))
    rows = model.hook_table()
    assert [r["name"] for r in rows] == list(model.hook_specs)
    by = {r["name"]: r for r in rows}
    assert by["blocks.0.attn.hook_pattern"]["axes"] == "batch head query_pos key_pos"
    assert by["blocks.0.attn.hook_result"]["opt_in"] == "use_attn_result"
    assert by["blocks.0.attn.hook_z"]["alias"] == "z"
    assert by["hook_pooled"]["axes"] == "batch d_pooled"


class _Features(nn.Module):
    """A stand-in for a spliced dictionary: 6 features per token, read back linearly."""

    def __init__(self, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.enc = nn.Parameter(torch.randn(d, 6, generator=g, dtype=torch.float64))
        declare_hooks(self, {"hook_acts": HookDecl("batch pos feature", "feature activations",
                                                   alias="acts")})

    def forward(self, x):
        return x + self.hook_acts(x @ self.enc) @ self.enc.T


def test_feature_selection_on_a_feature_axis():
    model = _model("plain", torch.float64)
    model.blocks[1].feats = _Features(32)
    mlp = model.blocks[1].mlp
    orig = mlp.forward

    def fwd(x):  # route block 1's MLP input through the features
        return orig(model.blocks[1].feats(x))

    mlp.forward = fwd
    model.setup()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = pl.patch(model, x, [(pl.Site("acts", layers=1, tokens=[0, 2], features=[1, 4]),
                               pl.Zero())])

    def zero(a, hook):
        a = a.clone()
        for t in (0, 2):
            a[:, t, [1, 4]] = 0
        return a

    with model.hooks(fwd_hooks=[("blocks.1.feats.hook_acts", zero)]):
        ref = model(x)
    assert torch.allclose(out, ref, atol=1e-12)
    with pytest.raises(InputError, match="no feature axis"):
        pl.patch(model, x, [(pl.Site("resid_pre", layers=1, features=[1]), pl.Zero())])
    with pytest.raises(InputError, match="out of range: that axis has 6"):
        pl.patch(model, x, [(pl.Site("acts", layers=1, features=[6]), pl.Zero())])
    with pytest.raises(InputError, match="non-negative"):
        pl.Site("acts", layers=1, features=[-1]).resolve(model)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
