"""The inputs of a run: items of a dataset, their collation into batches, and models by name."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError

IMAGE_KEYS = ("images", "clean", "corrupted")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(spec: str) -> list[str]:
    """Sorted image files of a directory or a glob pattern."""
    p = Path(spec)
    if p.is_dir():
        files = [str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXT]
    else:
        files = sorted(f for f in glob.glob(spec) if Path(f).suffix.lower() in IMAGE_EXT)
    return files


def _is_image_like(x: Any) -> bool:
    if isinstance(x, (str, Path)):
        return True
    if isinstance(x, Tensor):
        return x.ndim >= 2
    shape = getattr(x, "shape", None)  # numpy array
    if shape is not None:
        return len(shape) >= 2
    return type(x).__module__.startswith("PIL")


def _as_dict(item: Any) -> dict[str, Any]:
    """One item as a dict: images, (image, label, ...), (clean, corrupted) pairs or dicts."""
    if isinstance(item, dict):
        return item
    if isinstance(item, (tuple, list)):
        if len(item) == 2 and _is_image_like(item[0]) and _is_image_like(item[1]):
            return {"clean": item[0], "corrupted": item[1]}
        if not item:
            raise InputError("An item of the dataset is an empty tuple.")
        out = {"images": item[0]}
        if len(item) > 1:
            out["labels"] = item[1]
        out.update({f"field{i}": v for i, v in enumerate(item[2:], start=2)})
        return out
    return {"images": item}


def _needs_loading(v: list) -> bool:
    return any(not isinstance(x, Tensor) for x in v)


def collate(items: list[Any], index: range, model=None, device=None) -> dict[str, Any]:
    """A batch dict from items: image paths / PIL / arrays go through ``model.preprocess``,
    tensors are stacked as they are, numbers become tensors, strings stay lists; ``index`` holds
    the item ids."""
    dicts = [_as_dict(x) for x in items]
    keys = list(dicts[0])
    for d in dicts[1:]:
        if list(d) != keys:
            raise InputError(f"Items of one batch have different fields: {keys} vs {list(d)}.")
    batch: dict[str, Any] = {}
    for k in keys:
        v = [d[k] for d in dicts]
        if k in IMAGE_KEYS and _needs_loading(v):
            if model is None:
                raise InputError(f"Items hold image files or arrays ({k!r}); pass model= so they "
                                 "can be preprocessed with model.preprocess.")
            batch[k] = model.preprocess(v)
        elif all(isinstance(x, Tensor) for x in v):
            shapes = {tuple(x.shape) for x in v}
            if len(shapes) > 1:
                raise InputError(f"Items' {k!r} have different shapes {sorted(shapes)}; "
                                 "resize them to one shape (or pass image paths and a model).")
            batch[k] = torch.stack(v)
        elif all(isinstance(x, (int, float, bool)) for x in v):
            batch[k] = torch.tensor(v)
        else:
            batch[k] = v
    batch["index"] = torch.arange(index.start, index.stop)
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch


def as_items(data: Any) -> Any:
    """An indexable sequence of items from a map-style Dataset, a tensor, a list, a directory or
    glob string of images, or any other iterable (materialised as a list)."""
    if isinstance(data, (str, Path)):
        files = image_paths(str(data))
        if not files:
            raise InputError(f"No image files found in {str(data)!r} (a directory or glob).")
        return files
    if isinstance(data, torch.utils.data.IterableDataset):
        return list(data)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, dict):
        return data
    if isinstance(data, Iterable):
        return list(data)
    raise InputError(f"dataset must be a torch Dataset, a sequence, an iterable of items or a "
                     f"directory/glob of images; got {type(data).__name__}.")


# ---- models -------------------------------------------------------------------------------------
RECORD_KEYS = ("config", "sha256")


def check_record(path: str | Path) -> dict:
    """The JSON of a zoo-format model record (``config``, ``sha256``, the weights in the
    ``.safetensors`` beside it); `InputError` when it is malformed."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"model record {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno}); fix it or pass a model name.") from None
    if not isinstance(record, dict):
        raise InputError(f"model record {path} must hold a JSON object with keys "
                         f"{list(RECORD_KEYS)}, got {type(record).__name__}.")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise InputError(f"model record {path} lacks {missing}: a record needs 'config' (the "
                         "ViTConfig as JSON) and 'sha256' (of the .safetensors file beside it).")
    if not isinstance(record["config"], dict) or not isinstance(record["sha256"], str):
        raise InputError(f"model record {path}: 'config' must be an object and 'sha256' a hex "
                         "string.")
    return record


def load_model(name: str):
    """A `HookedViT` from a zoo / timm / Hugging Face name or a zoo-format record ``.json``."""
    from patchlens import HookedViT

    if name.endswith(".json") and Path(name).is_file():
        from patchlens.model.config import ViTConfig
        from patchlens.zoo.registry import load_from

        record = check_record(name)
        try:
            ViTConfig.from_json_dict(record["config"])
        except (TypeError, ValueError) as e:
            raise InputError(f"model record {name}: its 'config' is not a ViTConfig ({e}).") from e
        return load_from(name)
    return HookedViT.from_pretrained(name)
