"""`dataset`: map a task over a dataset into resumable shards, on one or many processes.

Items are assigned to shards by position only (shard ``k`` = items ``[k*S, (k+1)*S)``) and each
shard is computed in the same batches (``batch_size`` items from the shard's start), so the
shard files do not depend on the number of processes; shard ``k`` is computed by process
``k % world_size``. See `patchlens.run.shards` for the file format and docs/scaling.md.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.run import shards as S
from patchlens.run.adapters import TaskFn
from patchlens.run.fingerprint import (
    RunEnvironmentWarning,
    check_fingerprint,
    environment,
    environment_changes,
    fingerprint,
    model_dtype,
    task_identity,
)
from patchlens.run.inputs import as_items, collate, load_model
from patchlens.run.launch import all_reduce, barrier, get_state, watch_launcher
from patchlens.run.lock import RunLock
from patchlens.run.progress import Progress


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


# ---- the runner ---------------------------------------------------------------------------------
def _resolve_model(model: Any, device) -> Any:
    if model is None:
        return None
    if isinstance(model, str):
        model = load_model(model)
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    return model


def _check_output(out: Any, n: int, k: int) -> dict[str, Tensor]:
    if not isinstance(out, dict) or not out:
        raise InputError(f"A task function must return a non-empty dict[str, Tensor] with a "
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


def _check_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{name} must be a positive int, got {v!r}.")
    return v


def _renamed(old: dict[str, Any], task_name, task_args) -> tuple[Any, Any]:
    """``recipe_name`` / ``recipe_args`` (before 0.2) as ``task_name`` / ``task_args``."""
    unknown = sorted(set(old) - {"recipe_name", "recipe_args"})
    if unknown:
        raise InputError(f"dataset() got unexpected keyword argument(s) {unknown}.")
    for key, value in old.items():
        new = key.replace("recipe_", "task_")
        warnings.warn(f"dataset({key}=...) is now {new}=... (a dataset run maps a task function; "
                      "'recipe' names a patchlens.Recipe).", DeprecationWarning, stacklevel=3)
        if new == "task_name":
            task_name = value if task_name is None else task_name
        else:
            task_args = value if task_args is None else task_args
    return task_name, task_args


def dataset(
    task: TaskFn,
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
    task_name: str | None = None,
    task_args: Any = None,
    data_id: Any = None,
    verbose: bool = True,
    state: Any = None,
    **deprecated: Any,
) -> RunSummary:
    """Map a task function ``task(model, batch) -> dict[str, Tensor]`` over ``dataset`` into
    shards. (A *task* is any per-batch function; a `patchlens.Recipe` is something else: a
    composition of interventions.)

    Args:
        task: returns per-item tensors with a leading batch axis; wrap methods returning
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
            deletes them and recomputes everything. Resuming refuses (`InputError`, before
            computing anything) a directory written with another model, task, task
            arguments or dataset, and warns (`RunEnvironmentWarning`) when the environment
            that bitwise reproducibility depends on differs (see `fingerprint.environment`).
        progress: one tqdm bar on the main process (None: when stderr is a terminal).
        transform: ``batch -> batch`` applied after collation (e.g. normalisation).
        task_name: recorded in the manifest (default: the function's name).
        task_args: what identifies the task's arguments in the fingerprint (default: what
            `values` / `per_example` record, else the function's qualified name). Pass it for
            your own task functions whose behaviour depends on closure variables.
        **deprecated: ``recipe_name`` / ``recipe_args``, the names of ``task_name`` /
            ``task_args`` before 0.2 (accepted with a `DeprecationWarning`).
        data_id: identity of the dataset in the fingerprint (default: computed from the
            items; see `fingerprint.data_identity`).
        verbose: print the final summary on the main process.
        state: an accelerate `PartialState` (default `patchlens.run.launch.get_state`).

    Returns:
        `RunSummary`. Read the results with `load_results(out_dir)`.

    Raises:
        InputError: bad arguments, or resuming a directory of another run.
        RunLockedError: another live process writes ``out_dir``.
        ShardError: ``run.json`` is unreadable or malformed (pass ``resume=False``).
    """
    batch_size = _check_int("batch_size", batch_size)
    shard_size = _check_int("shard_size", shard_size)
    task_name, task_args = _renamed(deprecated, task_name, task_args)
    if not callable(task):
        raise InputError(f"task must be callable (model, batch) -> dict; got {task!r}.")
    out = S.check_out_dir(out_dir)
    items = as_items(dataset)
    n = len(items)
    if n == 0:
        raise InputError("The dataset is empty: nothing to run.")
    state = state if state is not None else get_state()
    watch_launcher()
    name = task_name or getattr(task, "__name__", type(task).__name__)
    model = _resolve_model(model, state.device)
    fp = fingerprint(model, task_identity(name, task, task_args), items, data_id)
    env = environment(state.device, model_dtype(model), batch_size)

    lock = RunLock(out) if state.is_main_process else None
    try:
        _lock_all(state, lock, out)
        return _run(task, items, out, model, state, name=name, fp=fp, env=env,
                    batch_size=batch_size, shard_size=shard_size, resume=resume,
                    progress=progress, verify=verify, transform=transform, verbose=verbose)
    finally:
        if lock is not None:
            lock.release()


def _lock_all(state, lock: RunLock | None, out: Path) -> None:
    """The main process takes the directory's lock; every process raises if it could not (so
    no rank waits forever for a main process that gave up)."""
    err = None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as e:  # RunLockedError, or an OSError creating the directory
            err = e
    (failed,) = all_reduce(state, [1.0 if err is not None else 0.0], "max")
    if failed:
        raise err or InputError(f"The main process could not take the lock of {out} (see its "
                                "error); nothing was computed.")


def _run(task, items, out: Path, model, state, *, name: str, fp: dict, env: dict,
         batch_size: int, shard_size: int, resume: bool, progress: bool | None, verify: bool,
         transform, verbose: bool) -> RunSummary:
    """Check the manifest, plan this process's shards, compute them, write the index."""
    n, rank, world = len(items), state.process_index, state.num_processes
    total = S.n_shards(n, shard_size)
    # every process checks the manifest (so all raise alike); the main process prepares the dir
    manifest = S.read_manifest(out) if resume else None
    if manifest is not None:
        S.check_manifest(manifest, out, n, shard_size)
        check_fingerprint(manifest["fingerprint"], fp, out)
        changes = environment_changes(manifest["environment"], env)
        if changes:
            warnings.warn(
                f"{out} was written in another environment ({'; '.join(changes)}; process "
                f"{rank}): the shards computed now may differ in the last bits from the finished "
                "ones. Shards are bitwise reproducible only with the same torch version, device, "
                "dtype, thread count, attention backend and batch size; pass resume=False "
                "(--no-resume) to recompute everything in one environment.",
                RunEnvironmentWarning, stacklevel=3)
    if state.is_main_process:
        (out / S.SHARDS).mkdir(parents=True, exist_ok=True)
        if not resume:
            S.clear_shards(out)
            (out / S.SHARDS).mkdir(parents=True, exist_ok=True)
        S.remove_temp_files(out)
        if manifest is None:
            S.atomic_write_json(out / S.MANIFEST, S.make_manifest(
                n, shard_size, name, fp, env, {"batch_size": batch_size, "world_size": world}))
    barrier(state)

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
    bar = Progress(out, n, shard_size, bool(progress) and state.is_main_process)
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
                    parts.append(_check_output(task(model, batch), len(idx), k))
                    bar.inflight = b0 + len(idx) - start
                if any(set(p) != set(parts[0]) for p in parts):
                    raise InputError(f"The task returned different keys for batches of shard {k}.")
                tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                tensors[S.ITEM_KEY] = torch.arange(start, stop)
                S.write_shard(out, k, start, stop, tensors, {
                    "rank": rank, "world_size": world, "batch_size": batch_size,
                    "recipe": name, "seconds": round(time.perf_counter() - t_shard, 4),
                    "environment": env})
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
