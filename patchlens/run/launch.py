"""Process glue: the accelerate `PartialState`, small collectives, and the ``patchlens run`` CLI.

One process without a launcher, ``accelerate launch`` (CPU with gloo, GPUs with nccl, several
nodes) and ``torchrun`` all end up here: `get_state` returns accelerate's `PartialState`, whose
``process_index`` / ``num_processes`` decide which shards a process computes and whose
``device`` is where the model and batches go.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

_TRUE = ("1", "true", "yes", "on")


def get_state(cpu: bool | None = None):
    """accelerate's `PartialState` (initialising torch.distributed when launched with several
    processes). ``cpu=None``: CPU when no GPU is visible or ``accelerate launch --cpu`` was used."""
    from accelerate import PartialState

    if cpu is None:
        cpu = (not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE)
    return PartialState(cpu=cpu)


def barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


def all_reduce(state, values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all processes (identity with one process)."""
    if state.num_processes == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def shutdown(state) -> None:
    """Wait for every process and tear the process group down (call once, before a launched
    script exits: a process group left to interpreter shutdown can abort a rank)."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on this machine (for a local ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(args: list[str], num_processes: int, port: int | None = None,
                       module: str = "patchlens.run", script: str | None = None) -> list[str]:
    """The argv of ``accelerate launch`` running ``python -m module args`` (or ``python script
    args``) in ``num_processes`` processes on this machine.

    Several processes use accelerate's torchrun launcher (``--multi_gpu``), which works on CPU
    too: `get_state` picks gloo and the CPU when no GPU is visible (``accelerate launch --cpu``
    starts a single process unless MPI is configured). To keep CPU processes on a GPU machine,
    set ``CUDA_VISIBLE_DEVICES=""`` or pass ``--cpu`` to ``patchlens.run``.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if num_processes > 1:
        cmd.append("--multi_gpu")
    return [*cmd, *([script] if script else ["-m", module]), *args]


# ---- the `patchlens run` command ---------------------------------------------------------------
RECIPES = ("caap", "activation", "logits")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(spec: str) -> list[str]:
    """Sorted image files of a directory or a glob pattern."""
    p = Path(spec)
    if p.is_dir():
        files = [str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXT]
    else:
        files = sorted(f for f in glob.glob(spec) if Path(f).suffix.lower() in IMAGE_EXT)
    return files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchlens run",
        description="Map a recipe over a dataset into resumable shards (see docs/scaling.md). "
                    "Launch with `accelerate launch -m patchlens.run ...` for several processes.")
    p.add_argument("recipe", choices=RECIPES, help="caap (maps), activation (per-item "
                   "layer x token patching effects), logits (plain forward)")
    p.add_argument("data", help="directory or glob of images, or zoo:clutter-digits:N[:SPLIT[:SEED]]")
    p.add_argument("--out", required=True, help="output directory (created; resumed if present)")
    p.add_argument("--model", default="clutter-digits-vit",
                   help="zoo / timm / Hugging Face name, or a zoo-format record .json")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--layers", default=None, help="a:b: CAAP window [a, b) / patched layers")
    p.add_argument("--corrupted", default=None, help="activation: directory/glob of corrupted "
                   "images paired with DATA in sorted order (zoo data: images of seed+1)")
    p.add_argument("--site", default=None, help="hook site (caap: resid_pre; activation: resid_pre)")
    p.add_argument("--no-resume", action="store_true", help="recompute every shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="skip SHA-256 checks of finished shards")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is visible")
    return p


def _load_model(name: str):
    from patchlens import HookedViT

    if name.endswith(".json") and Path(name).exists():
        from patchlens.zoo.registry import load_from

        return load_from(name)
    return HookedViT.from_pretrained(name)


def _layers(spec: str | None, n: int) -> tuple[int, int] | None:
    from patchlens.errors import InputError

    if spec is None:
        return None
    try:
        a, b = (int(v) if v else d for v, d in zip(spec.split(":"), (0, n)))
    except ValueError:
        raise InputError(f"--layers must look like a:b (e.g. 2:5), got {spec!r}") from None
    return a, b


class _Items(torch.utils.data.Dataset):
    """Dict items from aligned tensors (normalised images, labels, ...)."""

    def __init__(self, **fields: torch.Tensor):
        self.fields = fields
        self.n = len(next(iter(fields.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.fields.items()}


def _zoo_data(spec: str, model, pairs: bool):
    from patchlens.errors import InputError
    from patchlens.model.preprocess import preprocess
    from patchlens.zoo import generate

    parts = spec.split(":")
    if len(parts) < 3 or parts[1] != "clutter-digits":
        raise InputError(f"zoo data must look like zoo:clutter-digits:N[:split[:seed]], got {spec!r}")
    try:
        n = int(parts[2])
        split = parts[3] if len(parts) > 3 else "test"
        seed = int(parts[4]) if len(parts) > 4 else 0
    except ValueError:
        raise InputError(f"zoo data must look like zoo:clutter-digits:N[:split[:seed]], got {spec!r}") from None
    if n <= 0:
        raise InputError(f"zoo data needs N > 0 images, got {n}.")
    d = generate(n, split=split, seed=seed)
    fields = {"labels": torch.as_tensor(d.labels)}
    if pairs:
        fields["clean"] = preprocess(d.images, model.cfg)
        fields["corrupted"] = preprocess(generate(n, split=split, seed=seed + 1).images, model.cfg)
    else:
        fields["images"] = preprocess(d.images, model.cfg)
    return _Items(**fields)


def _file_data(spec: str, corrupted: str | None, pairs: bool):
    from patchlens.errors import InputError

    files = image_paths(spec)
    if not files:
        raise InputError(f"no image files in {spec!r} (a directory or glob of "
                         f"{', '.join(IMAGE_EXT)} files)")
    if not pairs:
        return files
    if corrupted is None:
        raise InputError("the activation recipe on image files needs --corrupted DIR (paired "
                         "with DATA in sorted order)")
    other = image_paths(corrupted)
    if len(other) != len(files):
        raise InputError(f"{len(files)} clean images but {len(other)} corrupted images")
    return list(zip(files, other))


def cli_recipe(name: str, model, layers: tuple[int, int] | None, site: str | None):
    """The recipe function of ``patchlens run NAME``."""
    from patchlens import metrics
    from patchlens.run.dataset import per_batch, per_example, values

    if name == "caap":
        from patchlens.recipes.caap import caap

        kw: dict[str, Any] = {"layers": layers, "progress": False}
        if site:
            kw["site"] = site
        return values(caap, **kw)
    if name == "activation":
        from patchlens.recipes.activation import activation_patching

        def metric(batch):
            if "labels" in batch:
                return metrics.logit(batch["labels"])
            with torch.inference_mode():
                return metrics.logit(model(batch["clean"]).argmax(-1))

        kw = {"metric": per_batch(metric), "progress": False, "per": "token"}
        if layers is not None:
            kw["layers"] = list(range(*layers))
        if site:
            kw["site"] = site
        return per_example(activation_patching, **kw)

    def logits(model, batch):
        return {"logits": model(batch["images"])}

    return logits


def cli_main(args: list[str]) -> int:
    """``patchlens run RECIPE DATA --out DIR [...]``; returns the exit code (2 on a user error)."""
    from patchlens.errors import PatchlensError
    from patchlens.run.dataset import dataset

    ns = _parser().parse_args(args)
    state = None
    try:
        state = get_state(cpu=True if ns.cpu else None)
        model = _load_model(ns.model)
        pairs = ns.recipe == "activation"
        if ns.data.startswith("zoo:"):
            data = _zoo_data(ns.data, model, pairs)
        else:
            data = _file_data(ns.data, ns.corrupted, pairs)
        recipe = cli_recipe(ns.recipe, model, _layers(ns.layers, model.cfg.n_layers), ns.site)
        dataset(recipe, data, ns.out, model=model, batch_size=ns.batch_size,
                shard_size=ns.shard_size, resume=not ns.no_resume,
                progress=False if ns.no_progress else None, verify=not ns.no_verify,
                recipe_name=ns.recipe, state=state)
    except (PatchlensError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown(state)
    return 0
