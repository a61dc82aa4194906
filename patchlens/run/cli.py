"""The ``patchlens run`` command (also ``python -m patchlens.run``, which launchers start): its
options, its three tasks and its data sources. Imports the runner; nothing in
`patchlens.run` imports this module except ``__main__`` and the package's ``cli_main``."""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from patchlens.errors import InputError
from patchlens.run.adapters import per_batch, per_example, values
from patchlens.run.dataset import dataset
from patchlens.run.inputs import IMAGE_EXT, image_paths, load_model
from patchlens.run.launch import get_state, shutdown

SPLITS = ("train", "test")
ZOO_DATA = "zoo:clutter-digits:N[:SPLIT[:SEED]]"


class TaskName(str, Enum):
    caap = "caap"
    activation = "activation"
    logits = "logits"


TASKS = tuple(r.value for r in TaskName)


# ---- data ---------------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    """Dict items from aligned tensors (normalised images, labels, ...)."""

    def __init__(self, **fields: torch.Tensor):
        self.fields = fields
        self.n = len(next(iter(fields.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.fields.items()}


def parse_zoo_data(spec: str) -> tuple[int, str, int]:
    """``(n, split, seed)`` of ``zoo:clutter-digits:N[:SPLIT[:SEED]]``."""
    parts = spec.split(":")
    bad = f"zoo data must look like {ZOO_DATA} (SPLIT: train or test), got {spec!r}"
    if len(parts) < 3 or len(parts) > 5 or parts[0] != "zoo" or parts[1] != "clutter-digits":
        raise InputError(bad)
    try:
        n = int(parts[2])
        seed = int(parts[4]) if len(parts) > 4 else 0
    except ValueError:
        raise InputError(bad) from None
    split = parts[3] if len(parts) > 3 else "test"
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} in {spec!r}: the zoo data has the splits "
                         f"{', '.join(SPLITS)} ({ZOO_DATA}).")
    if n <= 0:
        raise InputError(f"zoo data needs N > 0 images, got {n} in {spec!r}.")
    return n, split, seed


def zoo_data(spec: str, model, pairs: bool) -> _Items:
    """Generated clutter-digits images (normalised for ``model``) with labels; ``pairs``: clean
    images and, as corrupted, the images of ``seed + 1``."""
    from patchlens.model.preprocess import preprocess
    from patchlens.zoo import generate

    n, split, seed = parse_zoo_data(spec)
    d = generate(n, split=split, seed=seed)
    fields = {"labels": torch.as_tensor(d.labels)}
    if pairs:
        fields["clean"] = preprocess(d.images, model.cfg)
        fields["corrupted"] = preprocess(generate(n, split=split, seed=seed + 1).images, model.cfg)
    else:
        fields["images"] = preprocess(d.images, model.cfg)
    return _Items(**fields)


def file_data(spec: str, corrupted: str | None, pairs: bool) -> list:
    """Image paths of a directory or glob (pairs with ``corrupted``'s, in sorted order)."""
    files = image_paths(spec)
    if not files:
        raise InputError(f"no image files in {spec!r} (a directory or glob of "
                         f"{', '.join(IMAGE_EXT)} files)")
    if not pairs:
        return files
    if corrupted is None:
        raise InputError("the activation task on image files needs --corrupted DIR (paired "
                         "with DATA in sorted order)")
    other = image_paths(corrupted)
    if len(other) != len(files):
        raise InputError(f"{len(files)} clean images but {len(other)} corrupted images")
    return list(zip(files, other))


# ---- tasks ----------------------------------------------------------------------------------------
def parse_layers(spec: str | None, n: int) -> tuple[int, int] | None:
    """``"a:b"`` (either side may be empty: 0 and ``n``) -> ``(a, b)``."""
    if spec is None:
        return None
    try:
        a, b = (int(v) if v else d for v, d in zip(spec.split(":"), (0, n), strict=True))
    except ValueError:
        raise InputError(f"--layers must look like a:b (e.g. 2:5), got {spec!r}") from None
    return a, b


def cli_task(name: str, model, layers: tuple[int, int] | None, site: str | None):
    """The task function of ``patchlens run NAME``."""
    from patchlens import metrics

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
    if name != "logits":
        raise InputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")

    def logits(model, batch):
        return {"logits": model(batch["images"])}

    return logits


# ---- the command --------------------------------------------------------------------------------
HELP = ("Map a task over a dataset into resumable, checksummed shards (see docs/scaling.md). "
        "Launch with `accelerate launch -m patchlens.run ...` or `torchrun -m patchlens.run ...` "
        "for several processes; a re-run of the same command resumes.")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def run_command(
    task: Annotated[TaskName, typer.Argument(show_default=False, help="caap: attribution maps ('values'); activation: per-item layer x token effects of patching clean resid_pre into the corrupted run; logits: a plain forward.")],
    data: Annotated[str, typer.Argument(show_default=False, help="A directory or glob of images, or generated zoo images: zoo:clutter-digits:N, optionally followed by :SPLIT (train or test, default test) and :SEED (default 0), e.g. zoo:clutter-digits:100:test:3.")],
    out: Annotated[Path, typer.Option("--out", show_default=False, help="Run directory: created, or resumed if it holds the same run.")],
    model: Annotated[str, typer.Option("--model", help="A zoo, timm or Hugging Face model name, or a zoo-format record .json (next to its .safetensors).")] = "clutter-digits-vit",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per forward batch (part of what makes shards bitwise reproducible).")] = 16,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Items per shard file; fixed for the life of a run directory.")] = 256,
    layers: Annotated[str | None, typer.Option("--layers", show_default=False, help="Layers a:b (either side may be empty), the CAAP window [a, b) or the layers the activation task patches. Default: the method's default.")] = None,
    corrupted: Annotated[str | None, typer.Option("--corrupted", show_default=False, help="activation on image files: a directory or glob of corrupted images, paired with DATA in sorted order (zoo data: the images of SEED+1).")] = None,
    site: Annotated[str | None, typer.Option("--site", show_default=False, help="Hook site short name (default resid_pre); `patchlens hooks` lists the hook points.")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Delete the finished shards and recompute everything.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (by default one is shown when stderr is a terminal).")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Do not check finished shards' SHA-256 before skipping them.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on the CPU even if a GPU is visible.")] = False,
) -> None:
    from patchlens.cli_errors import USER_ERROR_EXIT, user_error

    state = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            state = get_state(cpu=True if cpu else None)
            m = load_model(model)
            pairs = task == TaskName.activation
            if data.startswith("zoo:"):
                items = zoo_data(data, m, pairs)
                n, split, seed = parse_zoo_data(data)
                data_id = {"zoo": "clutter-digits", "n": n, "split": split, "seed": seed,
                           "pairs": pairs}
            else:
                items, data_id = file_data(data, corrupted, pairs), None
            fn = cli_task(task.value, m, parse_layers(layers, m.cfg.n_layers), site)
            dataset(fn, items, out, model=m, batch_size=batch_size, shard_size=shard_size,
                    resume=not no_resume, progress=False if no_progress else None,
                    verify=not no_verify, task_name=task.value, data_id=data_id,
                    state=state)
    except Exception as e:
        msg = user_error(e, out)
        if msg is None:
            raise
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(code=USER_ERROR_EXIT) from None
    shutdown(state)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(name="run", help=HELP, no_args_is_help=True)(run_command)


def cli_main(args: list[str]) -> int:
    """``patchlens run RECIPE DATA --out DIR [...]``; returns the exit status (2 on a user
    error, with one ``error:`` line on stderr)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=list(args), prog_name="patchlens run", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
