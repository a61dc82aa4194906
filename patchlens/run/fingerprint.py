"""What a run directory's results depend on, recorded in ``run.json`` and checked on resume.

Two records:

- the *fingerprint* (model weights and config, task and its arguments, dataset identity):
  resuming with another one would mix two runs' results, so `check_fingerprint` refuses it;
- the *environment* (torch version, device, dtype, thread count, attention backend, batch
  size): shards are bitwise identical across process counts and resumes only when these are the
  same, so `environment_changes` lists what differs and the runner warns
  (`RunEnvironmentWarning`), since the results stay valid up to floating-point rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError

# keyword arguments of the adapters that do not change results (left out of the fingerprint)
NEUTRAL_ARGS = frozenset({"progress", "verbose"})


class RunEnvironmentWarning(UserWarning):
    """A run directory is resumed in another environment: new shards may differ from the
    finished ones in the last bits."""


# ---- describing values --------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return _sha(b"")
    return _sha(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def qualname(fn: Any) -> str:
    """``module.qualname`` of a function, class or callable object."""
    target = fn if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type,
                                   types.MethodType)) else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def describe(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able description of ``obj`` that identifies its value: tensors and arrays by
    dtype, shape and SHA-256 of their bytes, functions by qualified name (not their code) and
    the values their closure captured, containers and dataclasses element-wise, modules by
    type, other objects by type and repr (type only when the repr holds a memory address)."""
    if _depth > 20:
        return "..."
    d = _depth + 1
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return {"tensor": _tensor_digest(obj), "dtype": str(obj.dtype).removeprefix("torch."),
                "shape": list(obj.shape)}
    if type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):
        import numpy as np

        a = np.ascontiguousarray(obj)
        return {"array": _sha(a.tobytes()), "dtype": str(a.dtype), "shape": list(a.shape)}
    if type(obj).__module__.startswith("PIL") and hasattr(obj, "tobytes"):
        return {"image": _sha(obj.tobytes()), "mode": obj.mode, "size": list(obj.size)}
    if isinstance(obj, dict):
        return {str(k): describe(v, d) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [describe(v, d) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((describe(v, d) for v in obj), key=repr)
    if isinstance(obj, range):
        return repr(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    spec = getattr(obj, "run_spec", None)  # adapters and per_batch describe themselves
    if isinstance(spec, dict):
        return describe(spec, d)
    if isinstance(obj, functools.partial):
        return {"partial": describe(obj.func, d), "args": describe(obj.args, d),
                "kwargs": describe(obj.keywords, d)}
    if isinstance(obj, types.FunctionType) and (obj.__closure__ or obj.__defaults__):
        # a closure is identified by what it captured too (e.g. the labels of a metric)
        cells = []
        for c in obj.__closure__ or ():
            try:
                cells.append(describe(c.cell_contents, d))
            except ValueError:  # an empty cell
                cells.append(None)
        return {"function": qualname(obj), "closure": cells,
                "defaults": describe(obj.__defaults__, d)}
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return qualname(obj)
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if isinstance(obj, torch.nn.Module):  # a model captured by a closure: its type
        return qualname(obj)
    if dataclasses.is_dataclass(obj):  # e.g. metrics: their fields (a closure's labels)
        return {"object": qualname(obj), "fields": {f.name: describe(getattr(obj, f.name), d)
                                                    for f in dataclasses.fields(obj)}}
    r = repr(obj)
    if " at 0x" in r or len(r) > 2000:
        return qualname(obj)
    return f"{qualname(obj)}:{r}"


def digest(obj: Any) -> str:
    """SHA-256 of ``describe(obj)`` as sorted JSON."""
    return _sha(json.dumps(describe(obj), sort_keys=True, default=str).encode())


# ---- the three parts of a fingerprint -----------------------------------------------------------
def model_identity(model: Any) -> dict[str, str] | None:
    """``{"weights", "config"}``: SHA-256 of every parameter and buffer (name, dtype, shape,
    bytes) and of the config; None without a model."""
    if model is None:
        return None
    if not isinstance(model, torch.nn.Module):
        return {"object": digest(model)}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(_tensor_digest(t).encode())
    cfg = getattr(model, "cfg", None)
    cfg_json = cfg.to_json_dict() if hasattr(cfg, "to_json_dict") else None
    return {"weights": h.hexdigest(), "config": digest(cfg_json)}


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, Path)) or (
        isinstance(x, tuple) and bool(x) and all(isinstance(v, (str, Path)) for v in x))


def _abs(x: Any) -> Any:
    return os.path.abspath(x) if isinstance(x, (str, Path)) else [os.path.abspath(v) for v in x]


def data_identity(items: Any) -> dict[str, Any]:
    """Identity of a dataset: for a list of image paths (or pairs of paths) all absolute paths;
    otherwise the type, the length and the values of the first, middle and last item (so
    equally long datasets with other contents differ)."""
    n = len(items)
    if isinstance(items, list) and all(_is_path(x) for x in items):
        return {"kind": "paths", "n": n, "sha256": digest([_abs(x) for x in items])}
    sample = sorted({0, n // 2, n - 1}) if n else []
    return {"kind": qualname(items), "n": n,
            "sample": {str(i): digest(items[i]) for i in sample}}


def task_identity(name: str, task: Callable, task_args: Any = None) -> dict[str, Any]:
    """``{"name", "args"}``: ``task_args`` when given, else what an adapter recorded about
    itself (`values` / `per_example`: the method and its keyword arguments), else the
    function's qualified name."""
    if task_args is None:
        task_args = getattr(task, "run_spec", None) or qualname(task)
    return {"name": name, "args": describe(task_args)}


def fingerprint(model: Any, task: dict[str, Any], items: Any,
                data_id: Any = None) -> dict[str, Any]:
    """The fingerprint stored in ``run.json``: model, task, data (``data_id`` overrides the
    computed dataset identity, e.g. the spec of generated data)."""
    return {"model": model_identity(model), "recipe": task,
            "data": describe(data_id) if data_id is not None else data_identity(items)}


_WHAT = {"model": "another model (weights or config)",
         "recipe": "another task or other task arguments",
         "data": "another dataset (other items, even if as many)"}


def check_fingerprint(stored: dict[str, Any], current: dict[str, Any], out_dir: Any) -> None:
    """`InputError` when resuming ``out_dir`` with another model, task or dataset."""
    # run.json's keys: the task is stored under "recipe" (its name before 0.2)
    diff = [k for k in ("model", "recipe", "data") if stored.get(k) != current.get(k)]
    if not diff:
        return
    what = "; ".join(f"{_WHAT[k]} ({', '.join(differences(stored.get(k), current.get(k), k))})"
                     for k in diff)
    raise InputError(
        f"{out_dir} holds results of a different run: this call uses {what}. Resuming would mix "
        "the two runs' results. Use another out_dir (--out), or pass resume=False "
        "(--no-resume) to delete the finished shards and recompute everything.")


def differences(a: Any, b: Any, path: str, limit: int = 3) -> list[str]:
    """``["path.key: stored -> now", ...]`` for the first ``limit`` differing leaves."""
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if len(out) >= limit or x == y:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{p}.{k}")
        else:
            out.append(f"{p}: {_short(x)} -> {_short(y)}")

    walk(a, b, path)
    return out


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- environment --------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def _attention_backend(device: torch.device) -> str:
    """The scaled-dot-product attention kernels torch may pick (the math path is always used
    where the pattern is hooked)."""
    flags = {"flash": torch.backends.cuda.flash_sdp_enabled(),
             "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
             "math": torch.backends.cuda.math_sdp_enabled()}
    if torch.device(device).type == "cuda":
        flags["cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    return "sdpa:" + ",".join(k for k, on in flags.items() if on)


def environment(device: Any, dtype: torch.dtype | None, batch_size: int) -> dict[str, Any]:
    """What bitwise reproducibility of a shard depends on: torch version, device (and CPU
    instruction set), dtype, thread count, attention backend, deterministic-algorithm mode and
    batch size (plus the patchlens version)."""
    return {
        "patchlens": _patchlens_version(),
        "torch": torch.__version__,
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "threads": torch.get_num_threads(),
        "attention": _attention_backend(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "batch_size": batch_size,
    }


def _patchlens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("patchlens")
    except PackageNotFoundError:  # pragma: no cover (a source tree that is not installed)
        return "unknown"


def model_dtype(model: Any) -> torch.dtype | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return None


def environment_changes(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """``["threads: 1 -> 2", ...]`` for every recorded setting that differs."""
    if not stored:
        return []
    return [f"{k}: {stored[k]} -> {current[k]}" for k in current
            if k in stored and stored[k] != current[k]]


def adapter_spec(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What an adapter records about itself: the method and its keyword arguments
    (``NEUTRAL_ARGS`` left out)."""
    return {"method": qualname(fn), **{k: v for k, v in kwargs.items() if k not in NEUTRAL_ARGS}}
