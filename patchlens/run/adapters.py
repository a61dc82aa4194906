"""Task adapters: turn methods that return an `AttributionMap` or a `PatchResult` into task
functions ``(model, batch) -> dict[str, Tensor]`` whose tensors are batch-first (one row per
item), the layout of every shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from patchlens.errors import InputError
from patchlens.run.fingerprint import adapter_spec, qualname

TaskFn = Callable[[Any, dict[str, Any]], dict[str, Tensor]]


class per_batch:  # noqa: N801  (reads as a marker in keyword arguments)
    """Mark a keyword argument of `values` / `per_example` as computed from the batch:
    ``metric=per_batch(lambda batch: metrics.logit(batch["labels"]))``."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]):
        if not callable(fn):
            raise InputError(f"per_batch takes a function of the batch, got {fn!r}.")
        self.fn = fn
        self.run_spec = {"per_batch": qualname(fn)}


def _inputs(batch: dict[str, Any]) -> tuple[Tensor, ...]:
    if "clean" in batch and "corrupted" in batch:
        return batch["clean"], batch["corrupted"]
    if "images" not in batch:
        raise InputError(f"The batch has no 'images' (or 'clean'/'corrupted'); keys: {sorted(batch)}.")
    return (batch["images"],)


def _kwargs(kwargs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.fn(batch) if isinstance(v, per_batch) else v for k, v in kwargs.items()}


def _check_method(fn: Any) -> None:
    if not callable(fn):
        raise InputError(f"Expected a method to adapt (caap, activation_patching, ...), got {fn!r}.")


def values(fn: Callable[..., Any], *, key: str = "values", **kwargs: Any) -> TaskFn:
    """Adapt an `AttributionMap`-returning method (``caap``, baselines) to a task function:
    ``fn(model, images, **kwargs)`` -> ``{key: map.values [B, gh, gw], "target": [B]}``."""
    _check_method(fn)

    def task(model, batch):
        amap = fn(model, *_inputs(batch), **_kwargs(kwargs, batch))
        out = {key: amap.values}
        target = getattr(amap, "target", None)
        if isinstance(target, Tensor) and target.ndim == 1:
            out["target"] = target
        return out

    task.__name__ = getattr(fn, "__name__", "task")
    task.run_spec = {"adapter": "values", "key": key, **adapter_spec(fn, kwargs)}
    return task


def per_example(fn: Callable[..., Any], *, key: str = "per_example", **kwargs: Any) -> TaskFn:
    """Adapt a `PatchResult`-returning sweep (``activation_patching``, ``path_patching``):
    ``fn(model, clean, corrupted, **kwargs)`` -> ``{key: per_example [B, *axes] (the patched
    metric), "baseline": [B] (the unpatched target run's), "clean": [B], "corrupted": [B]}``;
    effects are ``per_example - baseline``. Batch first, like `PatchResult.per_example`."""
    _check_method(fn)

    def task(model, batch):
        res = fn(model, *_inputs(batch), **_kwargs(kwargs, batch))
        if res.per_example is None:
            raise InputError(f"{getattr(fn, '__name__', fn)} returned no per_example values.")
        out = {key: res.per_example}
        for name in ("baseline", "clean", "corrupted"):
            v = getattr(res, name, None)
            if isinstance(v, Tensor) and v.ndim == 1:
                out[name] = v
        return out

    task.__name__ = getattr(fn, "__name__", "task")
    task.run_spec = {"adapter": "per_example", "key": key, **adapter_spec(fn, kwargs)}
    return task
