"""Hugging Face converter: every supported family reproduces its source model (outputs and
residual streams) in float32 and float64, on random-init small configs (offline)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from patchlens import HookedViT
from patchlens.errors import (
    CheckpointMismatchError,
    UnknownModelError,
    UnsupportedModelError,
)
from patchlens.model.convert.hf import convert_hf_state_dict, hf_config

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
MLP = dict(intermediate_size=128, **SMALL)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _clip_cls_config():
    return T.CLIPConfig(vision_config=T.CLIPVisionConfig(**MLP), num_labels=5,
                        text_config=TEXT)


def _siglip_cls_config():
    return T.SiglipConfig(vision_config=T.SiglipVisionConfig(**MLP), num_labels=5,
                          text_config=TEXT)


# name -> (HF class, config factory, HF output the converted model reproduces)
FAMILIES = {
    "ViTModel": (T.ViTModel, lambda: T.ViTConfig(**MLP), lambda o: o.last_hidden_state[:, 0]),
    "ViTForImageClassification": (
        T.ViTForImageClassification, lambda: T.ViTConfig(num_labels=5, **MLP), lambda o: o.logits),
    "DeiTModel": (T.DeiTModel, lambda: T.DeiTConfig(**MLP), lambda o: o.last_hidden_state[:, 0]),
    "DeiTForImageClassification": (
        T.DeiTForImageClassification, lambda: T.DeiTConfig(num_labels=5, **MLP),
        lambda o: o.logits),
    "DeiTForImageClassificationWithTeacher": (
        T.DeiTForImageClassificationWithTeacher, lambda: T.DeiTConfig(num_labels=5, **MLP),
        lambda o: o.logits),
    "Dinov2Model": (T.Dinov2Model, lambda: T.Dinov2Config(**SMALL), lambda o: o.pooler_output),
    "Dinov2Model-swiglu": (
        T.Dinov2Model, lambda: T.Dinov2Config(use_swiglu_ffn=True, mlp_ratio=3, **SMALL),
        lambda o: o.pooler_output),
    "Dinov2ForImageClassification": (
        T.Dinov2ForImageClassification, lambda: T.Dinov2Config(num_labels=5, **SMALL),
        lambda o: o.logits),
    "Dinov2WithRegistersModel": (
        T.Dinov2WithRegistersModel,
        lambda: T.Dinov2WithRegistersConfig(num_register_tokens=2, **SMALL),
        lambda o: o.pooler_output),
    "Dinov2WithRegistersForImageClassification-swiglu": (
        T.Dinov2WithRegistersForImageClassification,
        lambda: T.Dinov2WithRegistersConfig(num_register_tokens=3, num_labels=5,
                                            use_swiglu_ffn=True, **SMALL),
        lambda o: o.logits),
    "CLIPVisionModel": (
        T.CLIPVisionModel, lambda: T.CLIPVisionConfig(**MLP), lambda o: o.pooler_output),
    "CLIPVisionModelWithProjection": (
        T.CLIPVisionModelWithProjection, lambda: T.CLIPVisionConfig(projection_dim=16, **MLP),
        lambda o: o.image_embeds),
    "CLIPForImageClassification": (
        T.CLIPForImageClassification, _clip_cls_config, lambda o: o.logits),
    "SiglipVisionModel": (
        T.SiglipVisionModel, lambda: T.SiglipVisionConfig(**MLP), lambda o: o.pooler_output),
    "SiglipForImageClassification": (
        T.SiglipForImageClassification, _siglip_cls_config, lambda o: o.logits),
}


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add seeded randn * 0.02 to every parameter: HF zero-initialises biases, tokens, ..."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


def make_hf(name: str, dtype=torch.float32):
    cls, make_cfg, _ = FAMILIES[name]
    torch.manual_seed(0)
    return perturb_(cls(make_cfg()).eval()).to(dtype)


TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_hf(name, dtype):
    hf = make_hf(name, dtype)
    model = HookedViT.from_hf(hf)
    assert not model.training and next(model.parameters()).dtype == dtype
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        ours, cache = model.run_with_cache(x, names_filter=lambda n: "resid" in n)
    expected = FAMILIES[name][2](out)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= TOL[dtype]
    hidden = out.hidden_states
    assert len(hidden) == model.cfg.n_layers + 1
    assert (cache["blocks.0.hook_resid_pre"] - hidden[0]).abs().max().item() <= TOL[dtype]
    for layer in range(model.cfg.n_layers):
        diff = (cache[f"blocks.{layer}.hook_resid_post"] - hidden[layer + 1]).abs().max().item()
        assert diff <= TOL[dtype], (layer, diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "name", ["Dinov2Model", "Dinov2WithRegistersForImageClassification-swiglu"]
)
@pytest.mark.parametrize("size", [(48, 48), (16, 24), (24, 40)])
def test_dinov2_other_image_size(name, dtype, size):
    """HF Dinov2 always resamples its position embedding; the converted model does the same."""
    hf = make_hf(name, dtype)
    model = HookedViT.from_hf(hf)
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(2), dtype=dtype)
    with torch.no_grad():
        expected = FAMILIES[name][2](hf(pixel_values=x))
        ours = model(x)
    assert (ours - expected).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize(
    "name", ["ViTForImageClassification", "CLIPVisionModel", "SiglipVisionModel"]
)
def test_interpolate_pos_encoding(name):
    hf = make_hf(name, torch.float64)
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    with pytest.raises(Exception, match="32x32"):
        HookedViT.from_hf(hf)(x)
    model = HookedViT.from_hf(hf, interpolate_pos_encoding=True)
    with torch.no_grad():
        expected = FAMILIES[name][2](hf(pixel_values=x, interpolate_pos_encoding=True))
    assert (model(x) - expected).abs().max().item() <= 1e-9


def test_config_fields():
    cfg = hf_config(make_hf("Dinov2WithRegistersForImageClassification-swiglu"))
    assert (cfg.n_registers, cfg.n_pos_prefix, cfg.pooling, cfg.mlp_kind) == (
        3, 1, "token_avg", "swiglu")
    assert cfg.layer_scale and cfg.eps == 1e-6 and cfg.d_mlp == 176  # (int(256 * 2/3) + 7) // 8 * 8
    cfg = hf_config(make_hf("CLIPVisionModelWithProjection"))
    assert (cfg.pre_norm, cfg.patch_bias, cfg.final_norm, cfg.act_fn) == (
        True, False, "post_pool", "quick_gelu")
    assert (cfg.n_classes, cfg.head_bias, cfg.eps, cfg.data_resize) == (16, False, 1e-5, "shortest")
    cfg = hf_config(make_hf("ViTModel"))
    assert (cfg.eps, cfg.n_classes, cfg.pooling, cfg.data_mean, cfg.data_resize) == (
        1e-12, 0, "token", (0.5, 0.5, 0.5), "exact")
    cfg = hf_config(make_hf("SiglipVisionModel"))
    assert (cfg.class_token, cfg.pooling, cfg.final_norm, cfg.act_fn) == (
        False, "map", "pre_pool", "gelu_tanh")


def test_from_config_builds_random_init_model():
    torch.manual_seed(0)
    config = T.Dinov2Config(num_labels=3, architectures=["Dinov2ForImageClassification"], **SMALL)
    model = HookedViT.from_hf(config)
    assert model.cfg.n_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert HookedViT.from_hf(T.ViTConfig(**MLP)).cfg.n_classes == 0


def test_local_directory_and_offline_name(tmp_path):
    hf = make_hf("ViTForImageClassification")
    hf.save_pretrained(tmp_path)
    model = HookedViT.from_hf(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-5
    with pytest.raises(UnknownModelError, match="local directory"):
        HookedViT.from_hf("no-such-org/no-such-model", local_files_only=True)


@pytest.mark.parametrize("config, model_type", [
    (T.SwinConfig(), "swin"), (T.BeitConfig(), "beit"),
    (T.ViTConfig(hidden_act="gelu_fast", **MLP), "gelu_fast"),
])
def test_unsupported_configs(config, model_type):
    with pytest.raises(UnsupportedModelError, match=model_type):
        hf_config(config)


def test_unsupported_model_class():
    torch.manual_seed(0)
    hf = T.ViTForMaskedImageModeling(T.ViTConfig(encoder_stride=8, **MLP))
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling"):
        HookedViT.from_hf(hf)


def test_missing_and_extra_keys_are_listed():
    hf = make_hf("Dinov2Model")
    cfg = hf_config(hf)
    sd = convert_hf_state_dict(hf.state_dict(), cfg, "dinov2")
    HookedViT.from_state_dict(cfg, sd)
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["blocks.1.mystery.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match="blocks.1.ls2.gamma") as err:
        HookedViT.from_state_dict(cfg, bad)
    assert "blocks.1.mystery.weight" in str(err.value)


def test_legacy_key_names():
    """Checkpoints with transformers-4 names (attention.attention.query, weights_in) convert too."""
    hf = make_hf("Dinov2Model-swiglu")
    cfg = hf_config(hf)
    legacy = {}
    for k, v in hf.state_dict().items():
        k = k.replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key")
        k = k.replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.down_proj", "mlp.weights_out")
        legacy[k] = v
    for i in range(cfg.n_layers):
        for w in ("weight", "bias"):
            parts = [legacy.pop(f"encoder.layer.{i}.mlp.{p}_proj.{w}") for p in ("gate", "up")]
            legacy[f"encoder.layer.{i}.mlp.weights_in.{w}"] = torch.cat(parts)
    new = convert_hf_state_dict(hf.state_dict(), cfg, "dinov2")
    old = convert_hf_state_dict(legacy, cfg, "dinov2")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


@pytest.mark.parametrize("make_cfg, cls", [(_clip_cls_config, T.CLIPModel),
                                           (_siglip_cls_config, T.SiglipModel)])
def test_dual_encoder_image_tower(make_cfg, cls):
    """CLIPModel / SiglipModel convert to their image tower: ``get_image_features``."""
    torch.manual_seed(0)
    hf = perturb_(cls(make_cfg()).eval()).double()
    model = HookedViT.from_hf(hf)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=x)
    expected = getattr(expected, "pooler_output", expected)
    assert (model(x) - expected).abs().max().item() <= 1e-9
