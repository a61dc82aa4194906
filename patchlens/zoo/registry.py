"""Names, descriptions and offline loading of the zoo models in ``patchlens/zoo/weights``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchlens.errors import PatchlensError, UnknownModelError, close_matches
from patchlens.files import sha256_file

__all__ = [
    "WEIGHTS_DIR",
    "ChecksumError",
    "UnknownModelError",
    "ZooEntry",
    "ZooList",
    "info",
    "is_zoo_name",
    "list_models",
    "load",
    "names",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class ChecksumError(PatchlensError, ValueError):
    """The weights file does not match the SHA-256 recorded next to it (corrupted or edited)."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: ``name`` and a one-line ``description``."""

    name: str
    description: str

    def __iter__(self):  # unpacks as (name, description)
        return iter((self.name, self.description))


class ZooList(list):
    """A list of `ZooEntry` (name, description) that prints as a table."""

    def __repr__(self) -> str:
        if not self:
            return "(the zoo is empty)"
        width = max(len(e.name) for e in self)
        return "\n".join(f"{e.name:<{width}}  {e.description}" for e in self)

    __str__ = __repr__


def _records(root: Path = WEIGHTS_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.glob("*.json"))}


def names() -> list[str]:
    """Names of the zoo models shipped with this installation."""
    return sorted(_records())


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` (optionally prefixed ``zoo:``) is a zoo model."""
    return isinstance(name, str) and name.removeprefix("zoo:") in _records()


def _unknown(name: str) -> UnknownModelError:
    available = names()
    matches = close_matches(name, available, n=3)
    hint = f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
    return UnknownModelError(
        f"Unknown zoo model {name!r}.{hint} Available zoo models: {', '.join(available)}."
    )


def info(name: str) -> dict[str, Any]:
    """The json record of a zoo model: config, training arguments, accuracies, sha256."""
    name = name.removeprefix("zoo:")
    path = _records().get(name)
    if path is None:
        raise _unknown(name)
    return json.loads(path.read_text())


def list_models() -> ZooList:
    """``[(name, description), ...]`` of the zoo models; prints as a table."""
    return ZooList(ZooEntry(n, info(n).get("description", "")) for n in names())


def _sha256(path: Path) -> str:
    return sha256_file(path)


def load_from(
    json_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Build a `HookedViT` from a zoo record ``json_path`` and the safetensors file beside it.

    Raises `ChecksumError` when the weights' SHA-256 differs from the record.
    """
    from safetensors.torch import load_file

    from patchlens.model.config import ViTConfig
    from patchlens.model.hooked_vit import HookedViT

    json_path = Path(json_path)
    record = json.loads(json_path.read_text())
    st_path = json_path.with_suffix(".safetensors")
    if not st_path.exists():
        raise FileNotFoundError(f"zoo weights {st_path} are missing (reinstall patchlens)")
    digest = _sha256(st_path)
    if digest != record["sha256"]:
        raise ChecksumError(
            f"{st_path} has SHA-256 {digest}, but {json_path.name} records {record['sha256']}: "
            "the file is corrupted or was modified (reinstall patchlens)."
        )
    cfg = ViTConfig.from_json_dict(record["config"])
    model = HookedViT.from_state_dict(cfg, load_file(str(st_path)))
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def load(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load zoo model ``name`` (offline) as an eval-mode `HookedViT`.

    The model takes images normalised with the config's ``data_mean`` / ``data_std`` (0.5 / 0.5):
    pass ``model.preprocess(images)`` or ``(images - 0.5) / 0.5`` for images in [0, 1].

    Raises:
        UnknownModelError: ``name`` is not a zoo model (the message lists the available ones).
        ChecksumError: the weights file does not match its recorded SHA-256.
    """
    key = name.removeprefix("zoo:") if isinstance(name, str) else name
    path = _records().get(key)
    if path is None:
        raise _unknown(str(name))
    return load_from(path, device=device, dtype=dtype)


def _register() -> None:
    """Make `HookedViT.from_pretrained` find zoo names (``name`` or ``zoo:name``)."""
    from patchlens.model.sources import ModelSource, register_source

    register_source(ModelSource("zoo", is_zoo_name, lambda cls, name, **kw: load(name, **kw),
                                names))


_register()
