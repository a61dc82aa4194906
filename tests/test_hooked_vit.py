"""HookedViT: exact conversion from timm, hook points, caches, fast paths, bad input."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import timm_vit
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from patchlens import (
    CheckpointMismatchError,
    HookedViT,
    InputError,
    UnknownHookError,
    UnsupportedModelError,
    ViTConfig,
)

TIMM_VARIANTS = {
    "cls_token": dict(),
    "avg_fc_norm": dict(class_token=False, global_pool="avg"),
    "map_head": dict(class_token=False, global_pool="map"),
    "layerscale": dict(init_values=1e-1),
    "registers": dict(reg_tokens=4),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_embed_class": dict(no_embed_class=True),
    "clip_pre_norm_quickgelu": dict(pre_norm=True, act_layer="quick_gelu", global_pool="token"),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "patch8_rect": dict(img_size=(48, 64), patch_size=8),
    "headless": dict(num_classes=0),
    "distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
}


def _pair(variant: str, dtype=torch.float32):
    src = timm_vit(**TIMM_VARIANTS[variant]).to(dtype)
    return src, HookedViT.from_timm(src)


def _images(src, n=4, dtype=torch.float32, seed=1, size=None):
    g = torch.Generator().manual_seed(seed)
    h, w = size or src.patch_embed.img_size
    return torch.randn(n, 3, h, w, generator=g).to(dtype)


@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_timm_outputs_match(variant, dtype, tol):
    src, model = _pair(variant, dtype)
    x = _images(src, dtype=dtype)
    with torch.no_grad():
        ref, out = src(x), model(x)
    assert out.dtype == dtype
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= tol


@pytest.mark.parametrize("variant", ["cls_token", "registers", "clip_pre_norm_quickgelu", "layerscale"])
def test_timm_block_outputs_match(variant):
    src, model = _pair(variant, torch.float64)
    x = _images(src, dtype=torch.float64)
    with torch.no_grad():
        ref = src.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                        return_prefix_tokens=True)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    for layer, (patches, prefix) in enumerate(ref):
        full = torch.cat([prefix, patches], dim=1)
        assert (cache["resid_post", layer] - full).abs().max().item() <= 1e-9


def test_dynamic_img_size_other_resolution():
    src = timm_vit(dynamic_img_size=True).double()
    model = HookedViT.from_timm(src)
    x = _images(src, dtype=torch.float64, size=(96, 80))
    with torch.no_grad():
        assert (model(x) - src(x)).abs().max().item() <= 1e-9
    assert model.layout_for((96, 80)).grid == (6, 5)


def test_non_dynamic_model_rejects_other_size(timm_pair):
    _, model = timm_pair
    with pytest.raises(InputError, match="64x64"):
        model(torch.randn(1, 3, 96, 96))


def test_both_attention_paths_agree(timm_pair):
    _, model = timm_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        slow = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: a)])
    assert torch.allclose(fast, slow, atol=1e-5)


def test_cpu_explicit_attention_matches_matmul_path(timm_pair):
    """The CPU explicit path (per-image strided GEMMs into preallocated outputs, used without
    autograd) gives the same scores, pattern and z as the differentiable matmul path, in
    float32 and float64, also when a hook hands back a non-contiguous tensor."""
    _, model = timm_pair
    x = torch.randn(3, 3, 64, 64)
    names = lambda n: n.endswith(("hook_attn_scores", "hook_pattern", "hook_z"))  # noqa: E731
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        m = model.to(dtype)
        xd = x.to(dtype)
        with torch.inference_mode():
            out_a, ca = m.run_with_cache(xd, names_filter=names)
        with torch.enable_grad():
            out_b, cb = m.run_with_cache(xd.clone().requires_grad_(True), names_filter=names)
        assert torch.allclose(out_a, out_b.detach(), atol=tol, rtol=0)
        for k in ca.cache_dict:
            assert torch.allclose(ca[k], cb[k].detach(), atol=tol, rtol=0), k
    model.to(torch.float32)
    # a q hook that returns a transposed-then-transposed-back (non-contiguous) tensor
    swap = (lambda n: n.endswith("hook_q"), lambda a, hook: a.transpose(0, 1).contiguous().transpose(0, 1))
    with torch.inference_mode():
        ref = model(x)
        assert torch.allclose(model.run_with_hooks(x, fwd_hooks=[swap, (lambda n: n.endswith(
            "hook_pattern"), lambda a, hook: a)]), ref, atol=1e-5)


def test_fast_path_used_without_hooks(timm_pair, monkeypatch):
    _, model = timm_pair
    calls = []
    orig = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        assert len(calls) == model.cfg.n_layers
        model.run_with_cache(torch.randn(1, 3, 64, 64))
        assert len(calls) == model.cfg.n_layers  # cache asks for the pattern: explicit path


def test_is_transformerlens_module(timm_pair):
    _, model = timm_pair
    assert isinstance(model, HookedRootModule)
    assert all(isinstance(h, HookPoint) for h in model.hook_dict.values())
    for name in ["hook_embed", "hook_pos_embed", "hook_full_embed", "blocks.0.hook_resid_pre",
                 "blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q",
                 "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z",
                 "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern",
                 "blocks.0.attn.hook_result", "blocks.0.hook_q_input", "blocks.0.hook_attn_out",
                 "blocks.0.hook_resid_mid", "blocks.0.ln2.hook_scale", "blocks.0.mlp.hook_pre",
                 "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
                 "ln_final.hook_scale", "ln_final.hook_normalized", "hook_pooled", "hook_logits"]:
        assert name in model.hook_dict, name


def test_cache_shapes_and_shorthand(timm_pair):
    _, model = timm_pair
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(2, 3, 64, 64))
    assert isinstance(cache, ActivationCache)
    n_tok, h, dh, d = 17, 4, 16, 64
    assert cache["resid_pre", 1].shape == (2, n_tok, d)
    assert cache["q", 0].shape == (2, n_tok, h, dh)
    assert cache["pattern", 2].shape == (2, h, n_tok, n_tok)
    assert cache["blocks.0.mlp.hook_post"].shape == (2, n_tok, 256)
    assert cache["hook_pooled"].shape == (2, d)
    assert torch.allclose(cache["pattern", 0].sum(-1), torch.ones(2, h, n_tok), atol=1e-5)


def test_cache_decompositions_are_exact():
    src = timm_vit(init_values=0.5).double()
    model = HookedViT.from_timm(src)
    x = _images(src, n=2, dtype=torch.float64)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    final = cache["resid_post", model.cfg.n_layers - 1]
    dec = cache.decompose_resid()
    assert (dec.sum(0) - final).abs().max() < 1e-10
    acc = cache.accumulated_resid()
    assert acc.shape[0] == model.cfg.n_layers + 1
    assert (acc[-1] - final).abs().max() == 0
    centred = final - final.mean(-1, keepdim=True)
    ln = cache.apply_ln_to_stack(dec, layer=-1)
    assert (ln.sum(0) - centred / cache["ln_final.hook_scale"]).abs().max() < 1e-10
    # normalised stack times the final norm's weights and bias = ln_final output
    ln_out = ln.sum(0) * model.ln_final.w + model.ln_final.b
    assert (ln_out - cache["ln_final.hook_normalized"]).abs().max() < 1e-10
    heads = cache.stack_head_results(layer=-1)
    n, h = model.cfg.n_layers, model.cfg.n_heads
    assert heads.shape[0] == n * h
    for layer in range(n):
        summed = heads[layer * h : (layer + 1) * h].sum(0)
        attn = model.blocks[layer]
        # residual contributions: LayerScale applied to the heads and to b_O
        expected = cache["attn_out", layer] - attn.attn.b_O * attn.ls1.gamma
        assert (summed - expected).abs().max() < 1e-10


def test_opt_in_hooks_do_not_change_outputs(timm_pair):
    _, model = timm_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with model.options(use_attn_result=True, use_split_qkv_input=True):
            out, cache = model.run_with_cache(x)
    assert torch.allclose(ref, out, atol=1e-5)
    assert cache["blocks.1.attn.hook_result"].shape == (2, 17, 4, 64)
    assert cache["blocks.1.hook_k_input"].shape == (2, 17, 4, 64)
    assert not model.cfg.use_attn_result and not model.cfg.use_split_qkv_input


def test_hook_edits_one_patch_token(timm_pair):
    _, model = timm_pair
    x = torch.randn(1, 3, 64, 64)
    tok = model.layout.token(2, 3)

    def zero_patch(act, hook):
        act[:, tok] = 0
        return act

    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
        _, cache = model.run_with_cache(x, names_filter=["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"])
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", zero_patch)]):
            _, edited = model.run_with_cache(x, names_filter="blocks.2.hook_resid_pre")
    assert torch.equal(clean["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre"])
    assert not torch.allclose(edited["blocks.2.hook_resid_pre"], cache["blocks.2.hook_resid_pre"])
    assert not any(h.fwd_hooks for h in model.hook_dict.values())


def test_start_and_stop_at_layer(timm_pair):
    _, model = timm_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mid = model(x, stop_at_layer=2)
        _, cache = model.run_with_cache(x, names_filter="blocks.2.hook_resid_pre")
        assert torch.allclose(mid, cache["resid_pre", 2], atol=1e-6)
        assert torch.allclose(model(mid, start_at_layer=2), model(x), atol=1e-5)


def test_dtype_and_half(timm_pair):
    _, model = timm_pair
    m64 = HookedViT.from_state_dict(model.cfg, model.state_dict()).to(torch.float64)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert m64(x).dtype == torch.float64
        mb = HookedViT.from_state_dict(model.cfg, model.state_dict()).to(torch.bfloat16)
        out = mb(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert HookedViT.from_state_dict(model.cfg, model.state_dict()).half().embed.proj.weight.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda(timm_pair):
    src, model = timm_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        out = HookedViT.from_timm(src).to("cuda")(x.cuda()).cpu()
    assert (out - ref).abs().max() < 1e-3


# ---- layout --------------------------------------------------------------------------------
def test_layout_prefix_and_grid():
    src = timm_vit(reg_tokens=2, img_size=(32, 48), patch_size=8)
    layout = HookedViT.from_timm(src).layout
    assert layout.prefix == ("cls", "reg0", "reg1")
    assert layout.grid == (4, 6)
    assert layout.cls == 0 and layout.registers == [1, 2]
    assert layout.token(0, 0) == 3 and layout.token(1, 2) == 3 + 6 + 2 and layout.token(-1, -1) == 26
    assert layout.rc(3 + 6 + 2) == (1, 2)
    assert all(layout.rc(layout.token(r, c)) == (r, c) for r in range(4) for c in range(6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[3, 5] = mask[0, 1] = True
    assert layout.mask_tokens(mask) == [4, 26]
    assert layout.rect_tokens((1, 3), (4, 6)) == [13, 14, 19, 20]
    vals = torch.arange(27.0)
    assert layout.to_grid(vals)[1, 2].item() == 11
    assert layout.label(0) == "cls" and layout.label(2) == "reg1" and layout.label(11) == "r1c2"
    with pytest.raises(InputError, match="outside"):
        layout.token(4, 0)
    with pytest.raises(InputError, match="not a patch token"):
        layout.rc(1)
    with pytest.raises(InputError, match="grid is"):
        layout.mask_tokens(torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="dist"):
        _ = layout.dist


# ---- preprocessing ----------------------------------------------------------------------------
def test_preprocess_inputs(tmp_path, timm_pair):
    import numpy as np
    from PIL import Image

    _, model = timm_pair
    arr = (np.random.default_rng(0).random((80, 100, 3)) * 255).astype("uint8")
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    a = model.preprocess(str(path))
    b = model.preprocess(Image.fromarray(arr))
    c = model.preprocess(arr)
    d = model.preprocess(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert a.shape == (1, 3, 64, 64)
    assert torch.allclose(a, b) and torch.allclose(a, c) and torch.allclose(a, d, atol=1e-5)
    batch = model.preprocess([arr, arr])
    assert batch.shape == (2, 3, 64, 64)
    # a 64x64 image in [0, 1] is only normalised
    x = torch.rand(3, 64, 64)
    mean = torch.tensor(model.cfg.data_mean).view(3, 1, 1)
    std = torch.tensor(model.cfg.data_std).view(3, 1, 1)
    assert torch.allclose(model.preprocess(x)[0], (x - mean) / std, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        model.preprocess(str(tmp_path / "missing.png"))
    with pytest.raises(InputError):
        model.preprocess(42)
    with pytest.raises(InputError, match="empty"):
        model.preprocess([])


def test_preprocess_matches_timm_eval_transform():
    import numpy as np
    from PIL import Image

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model = HookedViT.from_timm(src)
    cfg = timm.data.resolve_data_config({}, model=src)
    tf = timm.data.create_transform(**cfg)
    img = Image.fromarray((np.random.default_rng(1).random((300, 260, 3)) * 255).astype("uint8"))
    ref = tf(img)[None]
    out = model.preprocess(img)
    assert out.shape == ref.shape
    assert (out - ref).abs().mean() < 0.02  # PIL vs tensor resampling differ slightly


# ---- bad input -----------------------------------------------------------------------------
def _no_hooks(model):
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 1, 64, 64), "3 channels"),
    (torch.randn(2, 3, 64, 48), "64x64"),
    (torch.randint(0, 255, (2, 3, 64, 64)), "float"),
    (torch.randn(3, 64, 64), "batch"),
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
])
def test_bad_images(timm_pair, bad, match):
    _, model = timm_pair
    with pytest.raises(InputError, match=match):
        model(bad)
    with pytest.raises(InputError, match=match):
        model.run_with_cache(bad)
    assert _no_hooks(model)


def test_unknown_hook_names(timm_pair):
    _, model = timm_pair
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_pre"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pree", lambda a, hook: a)])
    with pytest.raises(UnknownHookError, match="hook_pattern"):
        model.run_with_cache(x, names_filter=["blocks.1.attn.pattern"])
    assert _no_hooks(model)


def test_hook_that_raises_leaves_no_hooks(timm_pair):
    _, model = timm_pair

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(torch.randn(1, 3, 64, 64), fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    assert _no_hooks(model)


def test_start_at_layer_checks(timm_pair):
    _, model = timm_pair
    with pytest.raises(InputError, match="out of range"):
        model(torch.randn(1, 17, 64), start_at_layer=9)
    with pytest.raises(InputError, match="residual stream"):
        model(torch.randn(1, 3, 64, 64), start_at_layer=1)


def test_unsupported_timm_models():
    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, img_size=64,
                              depth=1)
    with pytest.raises(UnsupportedModelError, match="RotaryEmbeddingMixed"):
        HookedViT.from_timm(mixed)
    relpos = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=64)
    with pytest.raises(UnsupportedModelError, match="relative"):
        HookedViT.from_timm(relpos)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64)
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        HookedViT.from_timm(hybrid)
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        HookedViT.from_timm(timm.create_model("resnet18", pretrained=False))


def test_checkpoint_key_mismatch(tmp_path):
    from safetensors.torch import save_file

    src = timm_vit()
    sd = dict(src.state_dict())
    sd.pop("blocks.1.attn.qkv.weight")
    sd["blocks.1.extra"] = torch.zeros(1)
    path = tmp_path / "ckpt.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=path, img_size=64,
                            patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=7)
    msg = str(err.value)
    assert "blocks.1.attn.qkv.weight" in msg and "blocks.1.extra" in msg


def test_checkpoint_path_loads(tmp_path):
    from safetensors.torch import save_file

    src = timm_vit()
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=path, img_size=64,
                                patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - src(x)).abs().max() < 1e-5


def test_config_roundtrip_and_validation(tiny_cfg):
    again = ViTConfig.from_json_dict(tiny_cfg.to_json_dict())
    assert again.to_json_dict() == tiny_cfg.to_json_dict()
    with pytest.raises(ValueError, match="at least patch_size"):
        ViTConfig(d_model=32, d_head=8, image_size=6, patch_size=8)
    assert ViTConfig(d_model=32, d_head=8, image_size=30, patch_size=8).grid_size == (3, 3)
    with pytest.raises(ValueError, match="pooling"):
        ViTConfig(d_model=32, d_head=8, image_size=32, patch_size=8, pooling="maximum")
    with pytest.raises(ValueError, match="Unknown ViTConfig"):
        ViTConfig.from_json_dict({"d_model": 32, "nonsense": 1})


def test_hook_table(tiny_model):
    rows = tiny_model.hook_table()
    names = [r["name"] for r in rows]
    assert names == list(tiny_model.hook_dict)
    shapes = {r["name"]: r["shape"] for r in rows}
    assert shapes["blocks.0.attn.hook_pattern"] == "1x4x17x17"
    assert shapes["blocks.0.attn.hook_result"] == "1x17x4x32"


def test_float64_weights_are_not_rounded():
    src = timm_vit().double()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 1e-12)  # not representable in float32
    model = HookedViT.from_timm(src)
    assert model.embed.proj.weight.dtype == torch.float64
    assert torch.equal(model.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_editing_the_layernorm_scale_takes_effect():
    src = timm_vit().double()
    model = HookedViT.from_timm(src)
    x = _images(src, n=2, dtype=torch.float64)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_mid")
        resid = cache["blocks.1.hook_resid_mid"]
        ln = model.blocks[1].ln2
        centred = resid - resid.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        expected = centred / (2 * scale) * ln.w + ln.b
        seen = {}

        def double(a, hook):
            return a * 2

        def keep(a, hook):
            seen["out"] = a.clone()
            return a

        model.run_with_hooks(x, fwd_hooks=[("blocks.1.ln2.hook_scale", double),
                                           ("blocks.1.ln2.hook_normalized", keep)])
    assert (seen["out"] - expected).abs().max() < 1e-12
    # and with autograd on, the differentiable path gives the same numbers
    out_grad = model(x.clone().requires_grad_(True))
    with torch.no_grad():
        assert torch.allclose(out_grad, model(x), atol=1e-12)
