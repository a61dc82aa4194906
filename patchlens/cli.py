"""The ``patchlens`` command."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="patchlens: hooked Vision Transformers and causal interventions.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _load(name: str):
    from patchlens import HookedViT, PatchlensError

    try:
        return HookedViT.from_pretrained(name)
    except (PatchlensError, FileNotFoundError, OSError) as e:
        _fail(str(e))


@app.command()
def hooks(model: str = typer.Argument("clutter-digits-vit", help="zoo, timm or Hugging Face name")):
    """Print the hook point table of MODEL (name, activation shape on one image)."""
    m = _load(model)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hook points of {model}")
    for col in ("name", "shape", "axes"):
        table.add_column(col)
    for row in m.hook_table():
        table.add_row(row["name"], row["shape"], row["axes"])
    Console().print(table)


@app.command()
def zoo():
    """List the embedded (offline) models."""
    from patchlens import zoo as zoo_mod

    for name, desc in zoo_mod.list():
        typer.echo(f"{name:32s} {desc}")


@app.command()
def demo(model: str = typer.Option("clutter-digits-vit", help="model to run on")):
    """Run the main demo on the embedded model."""
    from patchlens.demo import run_demo

    try:
        run_demo(model)
    except FileNotFoundError as e:
        _fail(str(e))


def main() -> None:  # pragma: no cover
    sys.exit(app())
