"""Rotary ViTs convert exactly: timm ``Eva`` (DINOv3, EVA-02, Perception Encoder), transformers
``DINOv3ViTModel``, open_clip ``EVA02-*`` / ``PE-Core-*`` towers; the rotary hooks hold the
source's own rotated q and k; the small remaining refusals of the plain family are gone and what
is still refused names the feature. Everything is random-init, shrunk and offline."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import transformers as T
from conftest import block_outputs, perturb_, timm_vit

from patchlens import HookedViT, InputError, UnsupportedModelError, ViTConfig, zeroshot_head
from patchlens.model.rotary import rotary_tables

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
SMALL = dict(depth=2, embed_dim=64)
# name -> (timm kwargs, the other image size); the native size is the model's own
TIMM = {
    "vit_small_patch16_dinov3": (dict(SMALL, num_heads=4), (192, 128)),
    "vit_small_patch16_dinov3_qkvb": (dict(SMALL, num_heads=4), (128, 160)),
    "eva02_tiny_patch14_224": (dict(SMALL, num_heads=2), None),
    "eva02_tiny_patch14_224@dynamic": (dict(SMALL, num_heads=2, dynamic_img_size=True),
                                       (168, 112)),
    "vit_pe_core_tiny_patch16_384": (dict(SMALL, num_heads=2), None),
    "vit_pe_core_tiny_patch16_384@dynamic": (dict(SMALL, num_heads=2, dynamic_img_size=True),
                                             (256, 192)),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def make_timm(key: str, dtype=torch.float64, **extra) -> torch.nn.Module:
    kwargs, _ = TIMM[key]
    torch.manual_seed(0)
    src = timm.create_model(key.split("@")[0], pretrained=False, **kwargs, **extra)
    return perturb_(src).eval().to(dtype)


def images(hw, n=2, dtype=torch.float64, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *hw, generator=g, dtype=dtype)


def sizes(key: str) -> list[tuple[int, int] | None]:
    return [None] + ([TIMM[key][1]] if TIMM[key][1] else [])


# ---- timm Eva ---------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("key", sorted(TIMM))
def test_timm_eva_logits_and_every_block_match(key, dtype):
    src = make_timm(key, dtype)
    model = HookedViT.from_timm(src)
    assert model.cfg.rope in ("timm_cat", "timm_dinov3")
    for hw in sizes(key):
        x = images(hw or model.cfg.image_size, dtype=dtype)
        with torch.no_grad():
            ref = src(x)
            inter = src.forward_intermediates(x, norm=False, output_fmt="NLC",
                                              intermediates_only=True, return_prefix_tokens=True)
            out, cache = model.run_with_cache(x, names_filter=lambda n: "resid_post" in n)
        assert out.dtype == dtype and rel(out, ref) <= TOL[dtype], (hw, rel(out, ref))
        for layer, (patches, prefix) in enumerate(inter):
            full = torch.cat([prefix, patches], dim=1)
            assert rel(cache["resid_post", layer], full) <= TOL[dtype], (hw, layer)


def test_dinov3_config_registers_layerscale_no_abs_pos():
    cfg = HookedViT.from_timm(make_timm("vit_small_patch16_dinov3")).cfg
    assert (cfg.n_registers, cfg.class_token, cfg.pos_embed, cfg.layer_scale) == (4, True, False, True)
    assert (cfg.rope, cfg.rope_rotate_half, cfg.rope_temperature) == ("timm_dinov3", True, 100.0)
    assert not cfg.qkv_bias and cfg.pooling == "avg" and cfg.dynamic_img_size
    assert cfg.positional_embedding_type == "rotary"
    assert HookedViT.from_timm(make_timm("vit_small_patch16_dinov3_qkvb")).cfg.qkv_bias
    eva = HookedViT.from_timm(make_timm("eva02_tiny_patch14_224")).cfg
    assert (eva.mlp_kind, eva.rope_ref_grid, eva.pos_embed, eva.gated_mlp) == ("swiglu", (16, 16), True, True)
    pe = HookedViT.from_timm(make_timm("vit_pe_core_tiny_patch16_384")).cfg
    assert (pe.pooling, pe.pool_include_prefix, pe.map_n_heads, pe.pre_norm) == ("map", True, 8, True)
    assert (pe.rope_grid_offset, pe.rope_grid_indexing, pe.rope_precision) == (1.0, "xy", "float32")


@pytest.mark.parametrize("name, kwargs", [
    ("eva02_base_patch16_clip_224", dict(SMALL, num_heads=2)),  # attn.norm, SwiGLU + mlp.norm
    ("vit_base_patch16_rope_reg1_gap_256", dict(SMALL, num_heads=2)),  # register, avg pool
    ("eva_giant_patch14_224", dict(SMALL, num_heads=2, img_size=56)),  # EVA-01: no rotary
    ("vit_small_patch16_lingbot", dict(SMALL, num_heads=4, img_size=64)),
    # no final norm at all (use_post_transformer_norm=False, use_fc_norm=False), avg pool
    ("vit_pe_spatial_tiny_patch16_512", dict(SMALL, num_heads=2, img_size=128)),
    # token pooling with fc_norm instead of the final norm; max and avg-max pooling
    ("vit_small_patch16_dinov3", dict(SMALL, num_heads=4, img_size=64, global_pool="token",
                                      use_fc_norm=True, use_post_transformer_norm=False)),
    ("eva02_tiny_patch14_224", dict(SMALL, num_heads=2, img_size=56, global_pool="max")),
    ("eva02_tiny_patch14_224", dict(SMALL, num_heads=2, img_size=56, global_pool="avgmax",
                                    init_values=0.1, attn_only_layer_scale=True)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_other_eva_variants_match(name, kwargs):
    torch.manual_seed(0)
    src = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval().double()
    model = HookedViT.from_timm(src)
    x = images(model.cfg.image_size)
    with torch.no_grad():
        assert rel(model(x), src(x)) <= 1e-9


def _record(monkeypatch, module, name: str, calls: list | None = None) -> list:
    """Wrap ``module.name`` (the source's own rotation function) to record its outputs in
    ``calls``: a hook on the rotated q and k inside the source's attention."""
    calls, fn = ([] if calls is None else calls), getattr(module, name)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("key", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                 "eva02_tiny_patch14_224@dynamic",
                                 "vit_pe_core_tiny_patch16_384@dynamic"])
def test_rot_hooks_equal_the_sources_rotated_q_and_k(key, monkeypatch):
    import timm.layers.attention as timm_attention
    import timm.models.eva as timm_eva

    src = make_timm(key)
    model = HookedViT.from_timm(src)
    p = model.cfg.n_prefix
    for hw in sizes(key):
        x = images(hw or model.cfg.image_size)
        calls = _record(monkeypatch, timm_eva, "apply_rot_embed_cat")
        _record(monkeypatch, timm_attention, "apply_rot_embed_cat", calls)
        with torch.no_grad():
            src(x)
            _, cache = model.run_with_cache(x)
        monkeypatch.undo()
        assert len(calls) == 2 * model.cfg.n_layers  # q then k, every block
        for layer in range(model.cfg.n_layers):
            for i, name in enumerate(("rot_q", "rot_k")):
                rotated = cache[name, layer]  # [batch, pos, head, d_head]
                ref = calls[2 * layer + i].transpose(1, 2)  # source: [batch, head, patches, d]
                assert rel(rotated[:, p:], ref) <= 1e-12, (hw, layer, name)
                # prefix tokens are not rotated; patches are
                plain = cache[name[-1], layer]
                assert torch.equal(rotated[:, :p], plain[:, :p])
                assert not torch.allclose(rotated[:, p:], plain[:, p:])


def test_rotary_tables_are_cached_per_grid():
    model = HookedViT.from_timm(make_timm("vit_small_patch16_dinov3"))
    x = images((64, 96))
    model(x)
    first = model.rotary.tables((4, 6), torch.float64, x.device)
    model(x)
    assert model.rotary.tables((4, 6), torch.float64, x.device) is first
    sin, cos = rotary_tables(model.cfg, (4, 6), torch.float64)
    assert torch.equal(first.sin[:, 0], sin) and torch.equal(first.cos[:, 0], cos)
    assert first.sin.shape == (24, 1, model.cfg.d_head)


def test_start_at_layer_finds_the_grid():
    model = HookedViT.from_timm(make_timm("vit_small_patch16_dinov3"))
    x = images((64, 96))  # 4 x 6 patches
    with torch.no_grad():
        ref = model(x)
        resid = model(x, stop_at_layer=1)
        assert torch.equal(model(resid, start_at_layer=1), ref)  # the last grid of 24 patches
        assert torch.equal(model(resid, start_at_layer=1, grid=(4, 6)), ref)
        assert not torch.allclose(model(resid, start_at_layer=1, grid=(6, 4)), ref)
        with pytest.raises(InputError, match="grid=\\(3, 3\\) has 9 patches"):
            model(resid, start_at_layer=1, grid=(3, 3))
        with pytest.raises(InputError, match="pass grid="):
            model(torch.randn(1, 5 + 7, 64, dtype=torch.float64), start_at_layer=1)


# ---- transformers DINOv3 ------------------------------------------------------------------------
def make_hf_dinov3(gated=False, dtype=torch.float64, cls=None):
    cfg = T.DINOv3ViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_register_tokens=4, image_size=64,
                            patch_size=16, use_gated_mlp=gated,
                            hidden_act="silu" if gated else "gelu", layerscale_value=0.1)
    torch.manual_seed(0)
    return perturb_((cls or T.DINOv3ViTModel)(cfg)).eval().to(dtype)


@DTYPES
@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "gated"])
def test_hf_dinov3_matches(gated, dtype):
    hf = make_hf_dinov3(gated, dtype)
    model = HookedViT.from_hf(hf)
    assert model.cfg.rope == "hf_dinov3" and model.cfg.n_registers == 4
    assert model.cfg.mlp_kind == ("swiglu" if gated else "mlp")
    for hw in [(64, 64), (48, 80)]:
        x = images(hw, dtype=dtype)
        with torch.no_grad():
            ref = hf(pixel_values=x, output_hidden_states=True)
            out, cache = model.run_with_cache(x, names_filter=lambda n: "resid_post" in n)
        assert rel(out, ref.pooler_output) <= TOL[dtype]
        for layer in range(2):
            assert rel(cache["resid_post", layer], ref.hidden_states[layer + 1]) <= TOL[dtype]


def test_hf_dinov3_rot_hooks_and_backbone(monkeypatch):
    from transformers.models.dinov3_vit import modeling_dinov3_vit as mod

    hf = make_hf_dinov3()
    model = HookedViT.from_hf(hf)
    x = images((48, 80))
    calls = _record(monkeypatch, mod, "apply_rotary_pos_emb")
    with torch.no_grad():
        hf(pixel_values=x)
        _, cache = model.run_with_cache(x)
    for layer, (q, k) in enumerate(calls):
        assert rel(cache["rot_q", layer], q.transpose(1, 2)) <= 1e-12
        assert rel(cache["rot_k", layer], k.transpose(1, 2)) <= 1e-12
    # the backbone wrapper: same weights, same model; its last feature map is the normed tokens
    backbone = make_hf_dinov3(cls=T.DINOv3ViTBackbone)
    backbone.load_state_dict(hf.state_dict(), strict=False)
    hooked_bb = HookedViT.from_hf(backbone)
    with torch.no_grad():
        fmap = backbone(pixel_values=x).feature_maps[-1]  # [batch, d, 3, 5]
        _, cache = hooked_bb.run_with_cache(x)
    tokens = cache["ln_final.hook_normalized"][:, 5:]
    assert rel(hooked_bb.layout_for((48, 80)).to_grid(tokens.transpose(1, 2)), fmap) <= 1e-12


# ---- open_clip EVA02 / PE-Core towers ------------------------------------------------------------
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def open_clip_tower_clip(name: str, monkeypatch, **timm_kwargs) -> torch.nn.Module:
    """The open_clip model ``name`` built from its own config dict with a small text tower and
    its timm trunk shrunk to 2 layers of width 64 (open_clip's TimmModel passes no size
    overrides to timm, so the test adds them to timm.create_model)."""
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text())
    monkeypatch.setattr(timm, "create_model",
                        functools.partial(timm.create_model, depth=2, embed_dim=64, num_heads=4,
                                          **timm_kwargs))
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=TEXT)
    monkeypatch.undo()
    return perturb_(clip).eval().double()


@DTYPES
@pytest.mark.parametrize("name, other", [("EVA02-B-16", (160, 128)), ("PE-Core-S-16-384", (256, 320))])
def test_open_clip_rotary_towers_and_zeroshot(name, other, dtype, monkeypatch):
    for kwargs, hw in [({}, None), (dict(dynamic_img_size=True), other)]:
        clip = open_clip_tower_clip(name, monkeypatch, **kwargs).to(dtype)
        model = HookedViT.from_open_clip(clip)
        assert model.cfg.rope == "timm_cat" and model.cfg.n_layers == 2
        x = images(hw or model.cfg.image_size, dtype=dtype)
        resid = block_outputs(clip.visual.trunk.blocks, functools.partial(clip.encode_image, x))
        with torch.no_grad():
            out, cache = model.run_with_cache(x, names_filter=lambda n: "resid_post" in n)
            assert rel(out, clip.encode_image(x)) <= TOL[dtype]
        for layer, r in enumerate(resid):
            assert rel(cache["resid_post", layer], r) <= TOL[dtype]
    if dtype == torch.float32:
        return
    # zero-shot head: the trunk's head (with a bias) is the image projection
    classes = ["cat", "dog", "car"]
    hooked = zeroshot_head(clip, classes)
    assert hooked.cfg.zeroshot["image_proj_bias"]
    text = open_clip.tokenize([f"a photo of a {c}." for c in classes], context_length=16)
    with torch.no_grad():
        img, txt, scale = clip(x, text)[:3]
        assert rel(hooked(x), scale * img @ txt.T) <= 1e-9


# ---- the plain family's last small refusals -------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(class_token=False, reg_tokens=1, global_pool="map", pool_include_prefix=True),
    dict(reg_tokens=2, global_pool="avg", pool_include_prefix=True),
    dict(global_pool="avgmax", class_token=False, reg_tokens=1),
    dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu", mlp_ratio=5.0),
    dict(mlp_layer=functools.partial(timm.layers.GluMlp, gate_last=True), mlp_ratio=4.0),
    dict(mlp_layer=functools.partial(timm.layers.SwiGLU, norm_layer=torch.nn.LayerNorm)),
    dict(scale_attn_norm=True, init_values=0.1),
], ids=["map_prefix", "avg_prefix", "avgmax", "swiglu_packed", "glu_gate_last",
        "swiglu_norm", "scale_attn_norm"])
def test_timm_vit_pool_include_prefix_and_glu(kwargs):
    src = timm_vit(**kwargs).double()
    model = HookedViT.from_timm(src)
    x = images((64, 64), n=3)
    with torch.no_grad():
        assert rel(model(x), src(x)) <= 1e-9


# ---- refusals name the feature ------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, match", [
    ("vit_small_patch16_rope_mixed_224", dict(img_size=64), "RotaryEmbeddingMixed"),
    ("eva02_enormous_patch14_clip_224", dict(img_size=56), "post-norm"),
    ("vit_base_patch16_sapiens2", dict(img_size=64, depth=2, num_heads=4, num_kv_heads=2),
     "grouped-query"),
    ("vit_small_patch16_dinov3", dict(norm_layer=timm.layers.RmsNorm, num_heads=4), "RMSNorm"),
])
def test_still_refused_eva_variants_name_the_feature(name, kwargs, match):
    kwargs = dict(dict(depth=1, embed_dim=64, num_heads=2), **kwargs)
    src = timm.create_model(name, pretrained=False, **kwargs).eval()
    with pytest.raises(UnsupportedModelError, match=match):
        HookedViT.from_timm(src)


def test_config_roundtrip_with_the_new_fields():
    cfg = HookedViT.from_timm(make_timm("eva02_tiny_patch14_224@dynamic")).cfg
    d = json.loads(json.dumps(cfg.to_json_dict()))
    back = ViTConfig.from_json_dict(d)
    assert back == cfg and back.rope_ref_grid == (16, 16)
    with pytest.raises(ValueError, match="rope must be"):
        cfg.replace(rope="spiral")
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(d_model=18, d_head=6, n_heads=3, n_layers=1, image_size=32, patch_size=8,
                  rope="timm_cat")
