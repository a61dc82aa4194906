"""`load`: an SAE from whatever names it: a zoo name, a SAELens or ViT-Prisma checkpoint, or a
state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchlens.errors import InputError
from patchlens.sae.loaders import (
    PRISMA_CFG,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    check_dtype,
    from_state_dict,
    load_prisma,
    load_saelens,
)
from patchlens.sae.sae import SAE
from patchlens.sae.zoo import is_zoo_sae, load_zoo_sae


def load(source: Any, dtype: torch.dtype | None = None, device: Any = None, **kwargs: Any) -> SAE:
    """An SAE from a zoo name (``"clutter-digits-vit.resid_post.2"``, see `patchlens.sae.zoo`),
    a SAELens folder, a ViT-Prisma folder or ``.pt`` file, or a state dict (``kwargs`` go to
    `from_state_dict`: ``kind``, ``k``, ``hook_name``...)."""
    check_dtype(dtype)
    if isinstance(source, dict):
        return from_state_dict(source, dtype=dtype, device=device, **kwargs)
    if kwargs:
        raise InputError(f"{sorted(kwargs)} only apply to state dicts.")
    if isinstance(source, str) and not Path(source).exists():
        if is_zoo_sae(source):
            return load_zoo_sae(source, dtype=dtype, device=device)
        raise InputError(f"{source!r} is neither a zoo SAE (patchlens.sae.zoo_saes()) nor an "
                         "existing path (a SAELens or ViT-Prisma folder or file).")
    if not isinstance(source, (str, Path)):
        raise InputError(f"load takes a path, a zoo name or a state dict, got "
                         f"{type(source).__name__}.")
    p = Path(source)
    if p.is_dir() and (p / SAELENS_CFG).exists():
        return load_saelens(p, dtype=dtype, device=device)
    if (p.is_dir() and ((p / PRISMA_CFG).exists() or any(p.glob("*.pt")))) or p.suffix == ".pt":
        return load_prisma(p, dtype=dtype, device=device)
    raise InputError(f"Cannot tell the format of {p}: a SAELens folder has {SAELENS_CFG} and "
                     f"{SAELENS_WEIGHTS}, a ViT-Prisma checkpoint {PRISMA_CFG} and a .pt file.")


__all__ = ["load"]
