"""CLIP family: open_clip image towers convert exactly, zero-shot heads reproduce the source
model's image-text logits (open_clip, HF CLIP, HF SigLIP), hooks and cache identities hold.
Everything is random-init and tiny (offline)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers as T
from conftest import block_outputs, perturb_
from open_clip.timm_model import TimmModel
from torch import nn

from patchlens import (
    HookedViT,
    InputError,
    UnknownModelError,
    UnsupportedModelError,
    zeroshot_head,
)
from patchlens.zeroshot import text_embeddings

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
VISION = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16)
VARIANTS = {
    "tok": (VISION, False),
    "tok_quickgelu": (VISION, True),
    "avg": (dict(VISION, pool_type="avg"), False),
    "avg_ln_after_pool_no_ln_pre": (
        dict(VISION, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True), False),
    "tok_ln_after_pool": (dict(VISION, final_ln_after_pool=True), True),
    "layerscale": (dict(VISION, ls_init_value=0.1), False),
    "qk_norm": (dict(VISION, qk_norm=True), False),
    "non_square_64px": (dict(VISION, image_size=(32, 64), patch_size=16, layers=3), False),
    # NormFormer-style norms inside attention and MLP -> attn.norm / mlp.norm
    "scale_attn_inner_scale_fc": (dict(VISION, scale_attn_inner=True, scale_fc=True), False),
    # CoCa's AttentionalPooler over all tokens (first query) -> pooling="coca"
    "coca_attentional_pool": (dict(VISION, attentional_pool=True, attn_pooler_heads=4,
                                   attn_pooler_queries=5), False),
}


def make_clip(vision=VISION, quick_gelu=False, dtype=torch.float64, seed=0, embed_dim=24):
    """A tiny perturbed open_clip CLIP (OpenAI BPE vocabulary, so open_clip.tokenize works)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=TEXT,
                           quick_gelu=quick_gelu)
    return perturb_(model, seed=seed).eval().to(dtype)


def timm_tower(pool="avg", proj="linear", proj_bias=False, name="vit_tiny_patch16_224", **kw):
    """An open_clip TimmModel around a tiny timm trunk (built directly: TimmModel cannot pass
    size overrides to timm)."""
    tower = TimmModel.__new__(TimmModel)
    nn.Module.__init__(tower)
    if name.startswith("vit"):
        kw = dict(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4), **kw)
    head = OrderedDict()
    if proj == "linear":
        tower.trunk = timm.create_model(name, num_classes=0, global_pool=pool, **kw)
        head = OrderedDict(drop=nn.Dropout(0.0), proj=nn.Linear(64, 24, bias=proj_bias))
    elif proj == "mlp":
        tower.trunk = timm.create_model(name, num_classes=0, global_pool=pool, **kw)
        head = OrderedDict(mlp=timm.layers.Mlp(64, 48, 24))
    else:
        tower.trunk = timm.create_model(name, num_classes=24, global_pool=pool, **kw)
    tower.head = nn.Sequential(head)
    return perturb_(tower).eval()


def _images(model, n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *model.cfg.image_size, generator=g, dtype=dtype)


# ---- exact conversion ---------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_open_clip_vit_matches_encode_image(variant, dtype):
    vision, quick = VARIANTS[variant]
    clip = make_clip(vision, quick, dtype)
    model = HookedViT.from_open_clip(clip)
    assert next(model.parameters()).dtype == dtype and not model.training
    assert model.cfg.act_fn == ("quick_gelu" if quick else "gelu")
    assert model.cfg.n_classes == 24 and not model.cfg.head_bias
    x = _images(model, dtype=dtype)
    resid = block_outputs(clip.visual.transformer.resblocks, lambda: clip.encode_image(x))
    with torch.no_grad():
        ref = clip.encode_image(x)
        out, cache = model.run_with_cache(x, names_filter=lambda n: "resid_post" in n)
    assert (out - ref).abs().max().item() <= TOL[dtype]
    for layer, r in enumerate(resid):
        assert (cache["resid_post", layer] - r).abs().max().item() <= TOL[dtype], layer
    # the tower itself converts too
    assert (HookedViT.from_open_clip(clip.visual)(x) - ref).abs().max().item() <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("kind", ["avg_linear", "token_linear_bias", "map_trunk_head"])
def test_timm_tower_matches(kind, dtype):
    pool, proj, bias = {"avg_linear": ("avg", "linear", False),
                        "token_linear_bias": ("token", "linear", True),
                        "map_trunk_head": ("map", "none", False)}[kind]
    extra = dict(class_token=False) if pool == "map" else dict(init_values=0.1)
    tower = timm_tower(pool, proj, bias, **extra).to(dtype)
    model = HookedViT.from_open_clip(tower)
    assert model.cfg.n_classes == 24 and model.cfg.head_bias == (bias or proj == "none")
    x = _images(model, dtype=dtype)
    resid = block_outputs(tower.trunk.blocks, lambda: tower(x))
    with torch.no_grad():
        out, cache = model.run_with_cache(x, names_filter=lambda n: "resid_post" in n)
        assert (out - tower(x)).abs().max().item() <= TOL[dtype]
    for layer, r in enumerate(resid):
        assert (cache["resid_post", layer] - r).abs().max().item() <= TOL[dtype], layer


def test_timm_tower_inside_clip():
    """A CLIP built by open_clip with a timm vision tower (the real TimmModel path)."""
    torch.manual_seed(0)
    vision = dict(timm_model_name="test_vit2", timm_pool="avg", timm_proj="linear", image_size=160)
    clip = perturb_(open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=TEXT)).eval()
    model = HookedViT.from_open_clip(clip)
    x = _images(model, n=1, dtype=torch.float32)
    with torch.no_grad():
        assert (model(x) - clip.encode_image(x)).abs().max().item() <= 1e-4


def test_from_name_random_init_and_quickgelu():
    small = dict(embed_dim=24, vision_cfg=VISION, text_cfg=TEXT)
    model = HookedViT.from_open_clip("ViT-B-32-quickgelu", **small)
    assert model.cfg.act_fn == "quick_gelu"
    assert model.cfg.source == "open_clip:ViT-B-32-quickgelu:random-init"
    assert HookedViT.from_open_clip("ViT-B-32", **small).cfg.act_fn == "gelu"
    with pytest.raises(UnknownModelError):
        HookedViT.from_open_clip("ViT-does-not-exist")


def _resnet_clip():
    vision = dict(layers=(1, 1, 1, 1), width=16, head_width=16, image_size=32)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=TEXT)


@pytest.mark.parametrize("make, match", [
    (_resnet_clip, "ModifiedResNet"),
    (lambda: make_clip(dict(VISION, attentional_pool="parallel", attn_pooler_heads=4,
                            attn_pooler_queries=4)), "attentional_pool='parallel'"),
    (lambda: make_clip(dict(VISION, attentional_pool=True, pool_type="avg",
                            attn_pooler_heads=4)), "AttentionalPooler with pool_type='avg'"),
    (lambda: make_clip(dict(VISION, pool_type="none")), "pool_type"),
    (lambda: make_clip(dict(VISION, scaled_cosine_attn=True)), "scaled_cosine_attn"),
    (lambda: make_clip(dict(VISION, scale_attn=True)), "scale_attn"),
    (lambda: timm_tower(proj="mlp"), "MLP projection"),
    (lambda: timm_tower(name="test_convnext", proj="none"), "ConvNeXt"),
])
def test_unsupported_towers_name_the_feature(make, match):
    with pytest.raises(UnsupportedModelError, match=match):
        HookedViT.from_open_clip(make())


# ---- preprocessing ------------------------------------------------------------------------------
def test_preprocess_matches_open_clip_transform():
    from PIL import Image

    kwargs = dict(embed_dim=24, vision_cfg=dict(VISION, image_size=64, patch_size=16),
                  text_cfg=TEXT)
    clip, _, transform = open_clip.create_model_and_transforms("ViT-B-32", **kwargs)
    model = HookedViT.from_open_clip(clip)
    cfg = model.cfg
    assert cfg.data_mean == pytest.approx(clip.visual.preprocess_cfg["mean"])
    assert (cfg.data_resize, cfg.data_interpolation) == ("shortest", "bicubic")
    assert cfg.data_crop_pct == 1
    yy, xx = np.mgrid[0:150, 0:200]
    arr = np.stack([np.sin(xx / 9), np.cos(yy / 13), np.sin((xx + yy) / 20)], -1) * 127 + 128
    img = Image.fromarray(arr.astype(np.uint8))
    ours, ref = model.preprocess(img), transform(img)[None]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean().item() < 0.02  # torch vs PIL bicubic kernels differ slightly


# ---- zero-shot heads ----------------------------------------------------------------------------
CLASSES = ["cat", "dog", "car"]
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@DTYPES
def test_open_clip_zeroshot_head_equals_logits(dtype):
    clip = make_clip(dtype=dtype)
    model = zeroshot_head(clip, CLASSES, TEMPLATES)
    x = _images(model, dtype=dtype)
    tokens = open_clip.tokenize([t.format(c) for c in CLASSES for t in TEMPLATES], 16)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokens), dim=-1).reshape(3, 2, -1).mean(1)
        ref = clip.logit_scale.exp() * clip.encode_image(x, normalize=True) @ F.normalize(text).T
        out, cache = model.run_with_cache(x)
        one = zeroshot_head(clip, CLASSES[:2])  # one template: exactly clip.get_logits
        logits, _ = clip.get_logits(x, open_clip.tokenize(["a photo of a cat.",
                                                           "a photo of a dog."], 16))
        assert (one(x) - logits).abs().max().item() <= TOL[dtype]
        assert (cache["hook_image_embed"] - clip.encode_image(x)).abs().max() <= TOL[dtype]
    assert (out - ref).abs().max().item() <= TOL[dtype]
    assert isinstance(model.head, nn.Linear) and model.W_U.shape == (24, 3)
    assert cache["hook_normalized_embed"].norm(dim=-1).sub(1).abs().max() <= TOL[dtype]
    zs = model.cfg.zeroshot
    assert zs["class_names"] == CLASSES and zs["templates"] == list(TEMPLATES)


def test_zeroshot_attaches_in_place_and_round_trips():
    clip = make_clip()
    hooked = HookedViT.from_open_clip(clip)
    x = _images(hooked)
    with torch.no_grad():
        image_features = hooked(x)
    same = zeroshot_head(clip, CLASSES, hooked=hooked)
    assert same is hooked and hooked.cfg.n_classes == 3
    with torch.no_grad():
        first = hooked(x)
        # two matmul paths (nn.Linear vs @): equal to float64 rounding, not necessarily bitwise
        torch.testing.assert_close(hooked(x, return_type="pooled") @ hooked.image_proj.weight.T,
                                   image_features, atol=1e-12, rtol=0)
    zeroshot_head(clip, CLASSES[::-1], hooked=hooked)  # re-attach: keeps the image projection
    reloaded = HookedViT.from_state_dict(hooked.cfg.replace(), hooked.state_dict())
    with torch.no_grad():
        assert torch.allclose(reloaded(x), first.flip(-1), atol=1e-12, rtol=0)
    assert hooked.cfg.zeroshot["class_names"] == CLASSES[::-1]


TEXT_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               vocab_size=100, pad_token_id=1, bos_token_id=0, eos_token_id=3,
               max_position_embeddings=16)
VISION_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, intermediate_size=128)


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "clip":
        cfg = T.CLIPConfig(vision_config=T.CLIPVisionConfig(**VISION_HF), text_config=TEXT_HF,
                           projection_dim=24)
        model = T.CLIPModel(cfg)
    else:
        cfg = T.SiglipConfig(vision_config=T.SiglipVisionConfig(**VISION_HF),
                             text_config=dict(TEXT_HF, hidden_size=64))
        model = T.SiglipModel(cfg)
    return perturb_(model).eval().double()


def _ids(n=3, seq=10, seed=0):
    ids = torch.randint(4, 100, (n, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 3  # eos
    return ids


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_zeroshot_head_equals_logits(kind):
    hf = _hf_model(kind)
    ids = _ids()
    model = zeroshot_head(hf, CLASSES, input_ids=ids)
    x = _images(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x).logits_per_image
        assert (model(x) - ref).abs().max().item() <= 1e-9
    if kind == "siglip":
        assert model.image_proj is None and model.b_U[0].item() == hf.logit_bias.item()

    # a tokenizer callable gives the same head
    table = {f"a photo of a {c}.": row for c, row in zip(CLASSES, ids)}
    same = zeroshot_head(hf, CLASSES,
                         tokenizer=lambda texts: torch.stack([table[t] for t in texts]))
    assert torch.equal(same.head.weight, model.head.weight)
    with pytest.raises(InputError, match="tokenizer"):
        zeroshot_head(hf, CLASSES)


def test_prompt_ensemble_with_input_ids():
    hf = _hf_model("clip")
    ids = torch.stack([_ids(seed=0), _ids(seed=1)], dim=1)  # [classes, templates, seq]
    feats = text_embeddings(hf, CLASSES, input_ids=ids)
    with torch.no_grad():
        per = [F.normalize(hf.get_text_features(input_ids=ids[:, t]).pooler_output, dim=-1)
               for t in range(2)]
    assert (feats - F.normalize(per[0] + per[1], dim=-1)).abs().max() <= 1e-12


def test_zeroshot_errors():
    clip = make_clip()
    with pytest.raises(InputError, match="contain"):
        zeroshot_head(clip, CLASSES, templates=("no placeholder",))
    with pytest.raises(InputError, match="do not fit"):
        zeroshot_head(clip, CLASSES, hooked=HookedViT.from_open_clip(make_clip(embed_dim=16)))
    with pytest.raises(UnsupportedModelError, match="zeroshot_head takes"):
        zeroshot_head(nn.Linear(2, 2), CLASSES)


# ---- hooks and cache identities -----------------------------------------------------------------
def test_hook_names_and_cache_identities():
    clip = make_clip(dict(VISION, no_ln_pre=True, pool_type="avg"))
    model = zeroshot_head(clip, CLASSES)
    for name in ["hook_embed", "hook_pos_embed", "blocks.1.hook_resid_post", "ln_final.hook_scale",
                 "hook_pooled", "hook_image_embed", "hook_normalized_embed", "hook_logits"]:
        assert name in model.hook_dict, name
    x = _images(model, n=2)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
    final = cache["resid_post", model.cfg.n_layers - 1]
    dec = cache.decompose_resid()
    assert (dec.sum(0) - final).abs().max() < 1e-10
    # direct logit attribution through the explicit normalisation: frozen LN scale and L2 norm
    ln = cache.apply_ln_to_stack(dec, layer=-1)[:, :, 1:].mean(2) * model.ln_final.w
    norm = cache["hook_image_embed"].norm(dim=-1, keepdim=True)
    per_component = (ln @ model.image_proj.weight.T / norm) @ model.W_U
    rest = (model.ln_final.b @ model.image_proj.weight.T / norm) @ model.W_U + model.b_U
    assert (per_component.sum(0) + rest - logits).abs().max() < 1e-10


def test_pre_norm_residual_identity():
    """With ln_pre the stream entering block 0 is ln_pre(embed + pos_embed): the attention and
    MLP outputs plus ``resid_pre 0`` sum to the final stream."""
    model = HookedViT.from_open_clip(make_clip())
    with torch.no_grad():
        _, cache = model.run_with_cache(_images(model, n=2))
    final = cache["resid_post", model.cfg.n_layers - 1]
    full = cache["hook_embed"] + cache["hook_pos_embed"]
    assert torch.equal(cache["hook_full_embed"], full)
    assert (model.ln_pre(full) - cache["resid_pre", 0]).abs().max() < 1e-12
    dec = cache.decompose_resid(incl_embeds=False)
    assert (dec.sum(0) + cache["resid_pre", 0] - final).abs().max() < 1e-10
