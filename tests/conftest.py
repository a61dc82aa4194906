"""Shared fixtures: small random-init models (no downloads)."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch

from patchlens import HookedViT, ViTConfig

torch.set_num_threads(2)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturb_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter (timm/HF init many biases, scales to 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def timm_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small random timm ViT (64px, patch 16 unless given), perturbed, in eval mode."""
    torch.manual_seed(seed)
    base = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=7)
    base.update(kwargs)
    name = base.pop("name", "vit_tiny_patch16_224")
    return perturb_(timm.create_model(name, pretrained=False, **base), seed=seed).eval()


def block_outputs(blocks, fn) -> list:
    """Outputs of every module in ``blocks`` (forward hooks) while running ``fn()``."""
    outs, handles = [], [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in blocks]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.fixture(scope="session")
def tiny_cfg() -> ViTConfig:
    return ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=64, image_size=(32, 32),
                     patch_size=(8, 8), n_classes=5)


@pytest.fixture()
def tiny_model(tiny_cfg) -> HookedViT:
    torch.manual_seed(0)
    return HookedViT(tiny_cfg).eval()


@pytest.fixture(scope="session")
def timm_pair():
    src = timm_vit()
    return src, HookedViT.from_timm(src)
