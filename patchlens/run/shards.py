"""Shard files of a dataset run: layout, atomic writes, checksums, validation and loading.

Layout of ``out_dir``::

    run.json                  manifest: format, n_items, shard_size, n_shards, task, created,
                              fingerprint (model, task, data) and environment
    run.lock                  held by the writing process (see `patchlens.run.lock`)
    shards/000000.safetensors tensors of items [0, S): every key has a leading item axis
    shards/000000.json        sidecar record: shard, start, stop, sha256, bytes, rank, created, keys
    index.jsonl               one sidecar record per line, in shard order (rewritten at the end)

A shard counts as finished only when its sidecar exists and the SHA-256 of the shard file equals
the sidecar's. Both files are written to a temporary name in the same directory, fsynced and
moved into place with `os.replace`, so a crash leaves either the old file or the new one.
The shard file's bytes depend only on the tensors (no timestamps, one sorted metadata entry),
so one process and N processes write byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError, PatchlensError
from patchlens.files import sha256_file

FORMAT = "patchlens-run/2"
MANIFEST = "run.json"
INDEX = "index.jsonl"
SHARDS = "shards"
ITEM_KEY = "_item"  # reserved key: the item ids of a shard, checked by `load_results`


class ShardError(PatchlensError, ValueError):
    """A run directory is incomplete or a shard is corrupt (the message says which and why)."""


# ---- atomic IO ----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_bytes` of ``obj`` as sorted, indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_temp_files(out_dir: str | Path) -> int:
    """Delete temp files left by interrupted writes; returns how many."""
    n = 0
    for d in (Path(out_dir), Path(out_dir) / SHARDS):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n


# ---- layout -------------------------------------------------------------------------------------
def shard_file(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"{k:06d}.safetensors"


def sidecar_file(out_dir: str | Path, k: int) -> Path:
    return Path(out_dir) / SHARDS / f"{k:06d}.json"


def shard_range(k: int, shard_size: int, n_items: int) -> tuple[int, int]:
    """Items ``[start, stop)`` of shard ``k``: ``[k*S, min((k+1)*S, n))``."""
    return k * shard_size, min((k + 1) * shard_size, n_items)


def n_shards(n_items: int, shard_size: int) -> int:
    return -(-n_items // shard_size)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- manifest -----------------------------------------------------------------------------------
def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; `InputError` if it exists and is not a directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {out} exists and is not a directory; pass a directory path.")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"out_dir {out} cannot be created: {parent} is a file, not a "
                                 "directory; pass a path under a directory.")
            break
    if (out / SHARDS).exists() and not (out / SHARDS).is_dir():
        raise InputError(f"{out / SHARDS} is not a directory; {out} is not a patchlens run dir.")
    return out


# required manifest keys and their types
MANIFEST_KEYS = {"format": str, "n_items": int, "shard_size": int, "n_shards": int,
                 "recipe": str, "fingerprint": dict, "environment": dict}


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of ``out_dir``, or None when there is none; `ShardError` when it is
    unreadable, of another format, or lacks keys."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    fix = ("Pass resume=False (--no-resume) to recompute everything, or use another out_dir "
           "(--out).")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} is unreadable ({e}). {fix}") from e
    if not isinstance(m, dict) or not str(m.get("format", "")).startswith("patchlens-run/"):
        raise ShardError(f"{path} is not a patchlens run manifest; is {out_dir} a patchlens run "
                         f"directory? {fix}")
    if m["format"] != FORMAT:
        raise ShardError(f"{path} was written by another patchlens version (format "
                         f"{m['format']}, this one reads {FORMAT}). {fix}")
    bad = [k for k, t in MANIFEST_KEYS.items()
           if not isinstance(m.get(k), t) or (t is int and isinstance(m.get(k), bool))]
    if bad:
        raise ShardError(f"{path} lacks or has malformed keys {bad} (it needs "
                         f"{sorted(MANIFEST_KEYS)}). {fix}")
    if m["n_shards"] != n_shards(m["n_items"], m["shard_size"]) or m["shard_size"] <= 0:
        raise ShardError(f"{path} is inconsistent: n_shards={m['n_shards']} for n_items="
                         f"{m['n_items']} and shard_size={m['shard_size']}. {fix}")
    return m


def check_manifest(m: dict, out_dir: str | Path, n_items: int, shard_size: int) -> None:
    """`InputError` when resuming ``out_dir`` with a different shard size or dataset length."""
    if m["shard_size"] != shard_size:
        raise InputError(
            f"{out_dir} was written with shard_size={m['shard_size']}, but this run asks for "
            f"shard_size={shard_size}; resume with shard_size={m['shard_size']}, use another "
            "out_dir, or pass resume=False (--no-resume) to recompute everything."
        )
    if m["n_items"] != n_items:
        raise InputError(
            f"{out_dir} holds a run over {m['n_items']} items, but the dataset has {n_items}; "
            "use another out_dir, or pass resume=False (--no-resume) to recompute everything."
        )


def make_manifest(n_items: int, shard_size: int, task: str, fingerprint: dict,
                  environment: dict, extra: dict | None = None) -> dict:
    return {"format": FORMAT, "n_items": n_items, "shard_size": shard_size,
            "n_shards": n_shards(n_items, shard_size), "recipe": task, "created": now(),
            "fingerprint": fingerprint, "environment": environment, **(extra or {})}


def clear_shards(out_dir: str | Path) -> None:
    """Delete every shard, sidecar and the index (``resume=False``)."""
    out = Path(out_dir)
    if (out / SHARDS).is_dir():
        shutil.rmtree(out / SHARDS)
    with contextlib.suppress(FileNotFoundError):
        (out / INDEX).unlink()


# ---- shards -------------------------------------------------------------------------------------
def encode_shard(k: int, start: int, stop: int, tensors: dict[str, Tensor]) -> bytes:
    """The safetensors bytes of one shard (deterministic: no timestamps, one metadata entry)."""
    from safetensors.torch import save

    meta = json.dumps({"format": FORMAT, "shard": k, "start": start, "stop": stop},
                      sort_keys=True)
    return save(tensors, metadata={"patchlens": meta})


def write_shard(out_dir: str | Path, k: int, start: int, stop: int,
                tensors: dict[str, Tensor], info: dict | None = None) -> dict:
    """Write shard ``k`` (items ``[start, stop)``) and then its sidecar; returns the record."""
    data = encode_shard(k, start, stop, tensors)
    path = shard_file(out_dir, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    record = {
        "shard": k, "start": start, "stop": stop, "file": f"{SHARDS}/{path.name}",
        "sha256": sha256_bytes(data), "bytes": len(data), "created": now(),
        "keys": {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                 for n, t in sorted(tensors.items()) if n != ITEM_KEY},
        **(info or {}),
    }
    atomic_write_json(sidecar_file(out_dir, k), record)
    return record


def read_sidecar(out_dir: str | Path, k: int) -> dict | None:
    try:
        rec = json.loads(sidecar_file(out_dir, k).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def shard_problem(out_dir: str | Path, k: int, start: int, stop: int,
                  verify: bool = True) -> str | None:
    """Why shard ``k`` is not finished (None when it is): missing, no sidecar, wrong range,
    wrong size, or a checksum mismatch (``verify``: hash the file)."""
    path = shard_file(out_dir, k)
    if not path.exists():
        return "missing"
    rec = read_sidecar(out_dir, k)
    if rec is None:
        return "no (readable) sidecar record"
    if (rec.get("shard"), rec.get("start"), rec.get("stop")) != (k, start, stop):
        return (f"sidecar says shard {rec.get('shard')} items [{rec.get('start')}, "
                f"{rec.get('stop')}), expected [{start}, {stop})")
    size = path.stat().st_size
    if size != rec.get("bytes"):
        return f"size {size} bytes, expected {rec.get('bytes')} (truncated or overwritten)"
    if verify:
        digest = sha256_file(path)
        if digest != rec.get("sha256"):
            return f"sha256 {digest[:12]}... does not match the record {str(rec.get('sha256'))[:12]}..."
    return None


def discard_shard(out_dir: str | Path, k: int) -> None:
    """Remove shard ``k``'s sidecar and file (before recomputing it)."""
    for p in (sidecar_file(out_dir, k), shard_file(out_dir, k)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def load_shard(out_dir: str | Path, k: int) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(shard_file(out_dir, k)))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ShardError(f"shard {k} ({shard_file(out_dir, k)}) is unreadable: {e}") from e


def write_index(out_dir: str | Path, total: int) -> int:
    """Rewrite ``index.jsonl`` from the sidecars of shards ``0..total-1``; returns the count."""
    lines = []
    for k in range(total):
        rec = read_sidecar(out_dir, k)
        if rec is not None:
            lines.append(json.dumps(rec, sort_keys=True))
    atomic_write_bytes(Path(out_dir) / INDEX, ("\n".join(lines) + "\n").encode() if lines else b"")
    return len(lines)


def read_index(out_dir: str | Path) -> list[dict]:
    """The records of ``index.jsonl`` (unparsable lines are skipped)."""
    path = Path(out_dir) / INDEX
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


# ---- loading ------------------------------------------------------------------------------------
def load_results(out_dir: str | Path, verify: bool = True,
                 keys: list[str] | None = None) -> dict[str, Tensor]:
    """Concatenate a run's shards in item order: ``{key: [n_items, ...]}``.

    Checks that every shard is present and intact (``verify``: SHA-256 against its record) and
    that the item ids cover ``0..n_items-1`` exactly once; raises `ShardError` naming the missing
    or corrupt shards otherwise (re-run the same `patchlens.run.dataset` call to complete them).
    """
    out = Path(out_dir)
    m = read_manifest(out)
    if m is None:
        raise ShardError(f"{out} has no {MANIFEST}: not a patchlens run directory (or not started).")
    n, size, total = m["n_items"], m["shard_size"], m["n_shards"]
    problems = []
    for k in range(total):
        start, stop = shard_range(k, size, n)
        why = shard_problem(out, k, start, stop, verify=verify)
        if why is not None:
            problems.append(f"shard {k} (items {start}-{stop - 1}): {why}")
    if problems:
        head = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ShardError(f"{out} is incomplete: {len(problems)} of {total} shards are not usable: "
                         f"{head}. Re-run the same dataset() call (resume=True) to complete them.")
    parts: dict[str, list[Tensor]] = {}
    names: set[str] | None = None
    for k in range(total):
        t = load_shard(out, k)
        if names is None:
            names = set(t)
        elif set(t) != names:
            raise ShardError(f"shard {k} has keys {sorted(t)}, shard 0 has {sorted(names)}.")
        for name, v in t.items():
            if keys is None or name in keys or name == ITEM_KEY:
                parts.setdefault(name, []).append(v)
    res = {name: torch.cat(v) for name, v in parts.items()}
    item = res.pop(ITEM_KEY, None)
    if item is None or not torch.equal(item, torch.arange(n, dtype=item.dtype)):
        raise ShardError(f"{out}: the shards' item ids are not 0..{n - 1} exactly once "
                         "(missing or duplicated items).")
    for name, v in res.items():
        if v.shape[0] != n:
            raise ShardError(f"key {name!r} has {v.shape[0]} rows for {n} items.")
    return res
