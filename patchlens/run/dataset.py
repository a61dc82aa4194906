"""`dataset`: map a recipe over a dataset into resumable shards, on one or many processes.

Items are assigned to shards by position only (shard ``k`` = items ``[k*S, (k+1)*S)``) and each
shard is computed in the same batches (``batch_size`` items from the shard's start), so the
shard files do not depend on the number of processes; shard ``k`` is computed by process
``k % world_size``. See `patchlens.run.shards` for the file format and docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.run import shards as S
from patchlens.run.launch import all_reduce, barrier, get_state

IMAGE_KEYS = ("images", "clean", "corrupted")

RecipeFn = Callable[[Any, dict[str, Any]], dict[str, Tensor]]


@dataclass
class RunSummary:
    """What a `dataset` run did (the same numbers on every process)."""

    out_dir: Path
    n_items: int
    n_shards: int
    shard_size: int
    computed_shards: int
    skipped_shards: int
    computed_items: int
    seconds: float
    world_size: int

    @property
    def items_per_s(self) -> float:
        return self.computed_items / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"{self.n_items} items in {self.n_shards} shards -> {self.out_dir}: computed "
                f"{self.computed_shards} shards ({self.computed_items} items), skipped "
                f"{self.skipped_shards} finished; {self.seconds:.1f} s, "
                f"{self.items_per_s:.1f} items/s on {self.world_size} process(es)")


# ---- recipe adapters ----------------------------------------------------------------------------
class per_batch:  # noqa: N801  (reads as a marker in keyword arguments)
    """Mark a keyword argument of `values` / `per_example` as computed from the batch:
    ``metric=per_batch(lambda batch: metrics.logit(batch["labels"]))``."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]):
        self.fn = fn


def _inputs(batch: dict[str, Any]) -> tuple[Tensor, ...]:
    if "clean" in batch and "corrupted" in batch:
        return batch["clean"], batch["corrupted"]
    if "images" not in batch:
        raise InputError(f"The batch has no 'images' (or 'clean'/'corrupted'); keys: {sorted(batch)}.")
    return (batch["images"],)


def _kwargs(kwargs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.fn(batch) if isinstance(v, per_batch) else v for k, v in kwargs.items()}


def values(fn: Callable[..., Any], *, key: str = "values", **kwargs: Any) -> RecipeFn:
    """Adapt an `AttributionMap`-returning method (``caap``, baselines) to a recipe function:
    ``fn(model, images, **kwargs)`` -> ``{key: map.values [B, gh, gw], "target": [B]}``."""

    def recipe(model, batch):
        amap = fn(model, *_inputs(batch), **_kwargs(kwargs, batch))
        out = {key: amap.values}
        target = getattr(amap, "target", None)
        if isinstance(target, Tensor) and target.ndim == 1:
            out["target"] = target
        return out

    recipe.__name__ = getattr(fn, "__name__", "recipe")
    return recipe


def per_example(fn: Callable[..., Any], *, key: str = "per_example", **kwargs: Any) -> RecipeFn:
    """Adapt a `PatchResult`-returning sweep (``activation_patching``, ``path_patching``):
    ``fn(model, clean, corrupted, **kwargs)`` -> ``{key: per_example [B, *axes] (the patched
    metric), "baseline": [B] (the unpatched target run's), "clean": [B], "corrupted": [B]}``;
    effects are ``per_example - baseline``."""

    def recipe(model, batch):
        res = fn(model, *_inputs(batch), **_kwargs(kwargs, batch))
        if res.per_example is None:
            raise InputError(f"{getattr(fn, '__name__', fn)} returned no per_example values.")
        out = {key: res.per_example}  # batch first, as the shards
        for name in ("baseline", "clean", "corrupted"):
            v = getattr(res, name, None)
            if isinstance(v, Tensor) and v.ndim == 1:
                out[name] = v
        return out

    recipe.__name__ = getattr(fn, "__name__", "recipe")
    return recipe


# ---- data ---------------------------------------------------------------------------------------
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
        from patchlens.run.launch import image_paths

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


def _resolve_model(model: Any, device) -> Any:
    if model is None:
        return None
    if isinstance(model, str):
        from patchlens.run.launch import _load_model

        model = _load_model(model)
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    return model


def _check_output(out: Any, n: int, k: int) -> dict[str, Tensor]:
    if not isinstance(out, dict) or not out:
        raise InputError(f"A recipe function must return a non-empty dict[str, Tensor] with a "
                         f"leading batch axis; got {type(out).__name__} (shard {k}). Wrap "
                         "PatchResult / AttributionMap methods with per_example() / values().")
    res = {}
    for name, v in out.items():
        if not isinstance(name, str) or name == S.ITEM_KEY or name == "":
            raise InputError(f"Recipe output keys must be non-empty strings other than "
                             f"{S.ITEM_KEY!r}; got {name!r}.")
        if not isinstance(v, Tensor) or v.ndim == 0 or v.shape[0] != n:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"Recipe output {name!r} must be a tensor [batch={n}, ...], got {got}.")
        res[name] = v.detach().to("cpu").contiguous()
    return res


# ---- progress -----------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar on the main process counting finished shards of all ranks (by watching the
    sidecars in ``out_dir``) plus the main process's own batches in flight."""

    def __init__(self, out: Path, n_items: int, shard_size: int, total: int, enabled: bool):
        self.out, self.n, self.size, self.total = out, n_items, shard_size, total
        self.inflight = 0
        self.bar = None
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_items, unit="item", desc="patchlens run", dynamic_ncols=True)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _done(self) -> int:
        items = 0
        with contextlib.suppress(OSError):
            for e in os.scandir(self.out / S.SHARDS):
                if e.name.endswith(".json") and not e.name.startswith("."):
                    with contextlib.suppress(ValueError):
                        start, stop = S.shard_range(int(e.name[:-5]), self.size, self.n)
                        items += max(0, stop - start)
        return items

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.n = min(self.n, self._done() + self.inflight)
            self.bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.refresh()
        if self.bar is not None:
            self.bar.close()


# ---- the runner ---------------------------------------------------------------------------------
def _check_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{name} must be a positive int, got {v!r}.")
    return v


def dataset(
    recipe_fn: RecipeFn,
    dataset: Any,
    out_dir: str | Path,
    *,
    model: Any = None,
    batch_size: int = 16,
    shard_size: int = 256,
    resume: bool = True,
    progress: bool | None = None,
    verify: bool = True,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    recipe_name: str | None = None,
    verbose: bool = True,
    state: Any = None,
) -> RunSummary:
    """Map ``recipe_fn(model, batch) -> dict[str, Tensor]`` over ``dataset`` into shards.

    Args:
        recipe_fn: returns per-item tensors with a leading batch axis; wrap methods returning
            an `AttributionMap` / `PatchResult` with `values` / `per_example`. The batch is a
            dict: ``images`` (or ``clean`` / ``corrupted`` for pairs), ``labels`` and other
            fields of the items, and ``index`` (item ids).
        dataset: a map-style torch Dataset / sequence of images, ``(image, label, ...)``
            tuples, ``(clean, corrupted)`` pairs or dicts; image paths (or PIL / arrays) are
            loaded with ``model.preprocess``, tensors are used as they are; a directory or glob
            string of images; other iterables are materialised.
        out_dir: run directory (created). Shard ``k`` holds items ``[k*S, (k+1)*S)``.
        model: a `HookedViT`, a model name (loaded on every process) or None; moved to the
            process's device.
        resume: skip shards already finished (checksum verified when ``verify``); False
            deletes them and recomputes everything.
        progress: one tqdm bar on the main process (None: when stderr is a terminal).
        transform: ``batch -> batch`` applied after collation (e.g. normalisation).
        recipe_name: recorded in the manifest (default: the function's name).
        verbose: print the final summary on the main process.
        state: an accelerate `PartialState` (default `patchlens.run.launch.get_state`).

    Returns:
        `RunSummary`. Read the results with `load_results(out_dir)`.
    """
    batch_size = _check_int("batch_size", batch_size)
    shard_size = _check_int("shard_size", shard_size)
    if not callable(recipe_fn):
        raise InputError(f"recipe_fn must be callable (model, batch) -> dict; got {recipe_fn!r}.")
    out = S.check_out_dir(out_dir)
    items = as_items(dataset)
    n = len(items)
    if n == 0:
        raise InputError("The dataset is empty: nothing to run.")
    state = state if state is not None else get_state()
    rank, world = state.process_index, state.num_processes
    total = S.n_shards(n, shard_size)
    name = recipe_name or getattr(recipe_fn, "__name__", type(recipe_fn).__name__)

    # every process checks the manifest (so all raise alike); the main process prepares the dir
    manifest = S.read_manifest(out) if resume else None
    if manifest is not None:
        S.check_manifest(manifest, out, n, shard_size)
    if state.is_main_process:
        (out / S.SHARDS).mkdir(parents=True, exist_ok=True)
        if not resume:
            S.clear_shards(out)
            (out / S.SHARDS).mkdir(parents=True, exist_ok=True)
        S.remove_temp_files(out)
        if manifest is None:
            S.atomic_write_json(out / S.MANIFEST, S.make_manifest(
                n, shard_size, name, {"batch_size": batch_size, "world_size": world}))
    barrier(state)
    model = _resolve_model(model, state.device)

    mine = list(range(rank, total, world))
    todo = []
    for k in mine:
        start, stop = S.shard_range(k, shard_size, n)
        if resume and S.shard_problem(out, k, start, stop, verify=verify) is None:
            continue
        S.discard_shard(out, k)  # a stale or corrupt shard must not count as finished
        todo.append(k)
    barrier(state)

    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(out, n, shard_size, total, bool(progress) and state.is_main_process)
    t0 = time.perf_counter()
    computed_items = 0
    try:
        with torch.no_grad():
            for k in todo:
                start, stop = S.shard_range(k, shard_size, n)
                t_shard = time.perf_counter()
                parts: list[dict[str, Tensor]] = []
                for b0 in range(start, stop, batch_size):
                    idx = range(b0, min(b0 + batch_size, stop))
                    batch = collate([items[i] for i in idx], idx, model, state.device)
                    if transform is not None:
                        batch = transform(batch)
                    parts.append(_check_output(recipe_fn(model, batch), len(idx), k))
                    bar.inflight = b0 + len(idx) - start
                if any(set(p) != set(parts[0]) for p in parts):
                    raise InputError(f"The recipe returned different keys for batches of shard {k}.")
                tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                tensors[S.ITEM_KEY] = torch.arange(start, stop)
                S.write_shard(out, k, start, stop, tensors, {
                    "rank": rank, "world_size": world, "batch_size": batch_size,
                    "recipe": name, "seconds": round(time.perf_counter() - t_shard, 4)})
                bar.inflight = 0
                computed_items += stop - start
        seconds = time.perf_counter() - t0
        done, skipped, items_done = all_reduce(
            state, [len(todo), len(mine) - len(todo), computed_items], "sum")
        (seconds,) = all_reduce(state, [seconds], "max")
        barrier(state)
    finally:
        bar.close()
    if state.is_main_process:
        S.write_index(out, total)
    summary = RunSummary(out, n, total, shard_size, int(done), int(skipped), int(items_done),
                         seconds, world)
    if verbose and state.is_main_process:
        print(summary, flush=True)
    barrier(state)
    return summary


load_results = S.load_results
