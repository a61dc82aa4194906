"""The ``patchlens`` command: demo, caap, patch, hooks, zoo, bench, run.

Errors a user can cause (a missing file, an unknown model, an unreadable image) print one line
and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="patchlens: hooked Vision Transformers and causal interventions.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _guard(fn, *args, **kwargs):
    """Run ``fn`` turning user errors into one line and exit code 2."""
    from patchlens.errors import PatchlensError

    try:
        return fn(*args, **kwargs)
    except (PatchlensError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        _fail(str(e).strip("'\""))
    except OSError as e:
        _fail(f"could not read an input: {e}")


def _check_files(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            _fail(f"file not found: {p}")
        if p.is_dir():
            _fail(f"{p} is a directory; pass image files")


def _load(name: str):
    from patchlens import HookedViT

    return _guard(HookedViT.from_pretrained, name)


def _layers(spec: str, n: int) -> tuple[int, int]:
    try:
        a, b = (int(v) if v else d for v, d in zip(spec.split(":"), (0, n)))
    except ValueError:
        _fail(f"--layers must look like a:b (e.g. 2:5), got {spec!r}")
    return a, b


@app.command()
def demo(
    model: str = typer.Option("clutter-digits-vit", help="zoo, timm or Hugging Face model name"),
    images: list[Path] = typer.Option(None, "--images", help="image files (default: zoo images)"),
    out: Path = typer.Option(Path("patchlens-report.html"), help="where to write the HTML report"),
    n: int = typer.Option(4, help="number of zoo images when --images is not given"),
):
    """Run the main study (predictions, activation and path patching, CAAP, divergence) and
    write a self-contained HTML report."""
    from patchlens.demo import run_demo

    if images:
        _check_files(images)
    _guard(run_demo, model, [str(p) for p in images] if images else None, out, n)


@app.command()
def hooks(model: str = typer.Argument("clutter-digits-vit", help="zoo, timm or Hugging Face name")):
    """Print the hook point table of MODEL (name, activation shape on one image, axes)."""
    m = _load(model)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hook points of {model}")
    for col in ("name", "shape", "axes"):
        table.add_column(col, no_wrap=True)
    for row in m.hook_table():
        table.add_row(row["name"], row["shape"], row["axes"])
    console = Console()
    console.print(table, width=max(console.width, 110))


@app.command()
def zoo():
    """List the embedded (offline) models."""
    from patchlens import zoo as zoo_mod

    for name, desc in zoo_mod.list():
        typer.echo(f"{name:32s} {desc}")


@app.command()
def patch(
    clean: Path = typer.Argument(..., help="clean image"),
    corrupted: Path = typer.Argument(..., help="corrupted image"),
    model: str = typer.Option("clutter-digits-vit", help="model name"),
    site: str = typer.Option("resid_pre", help="site short name"),
    per: str = typer.Option("token", help="token | head | layer"),
    target: int = typer.Option(None, help="class to measure (default: predicted on clean)"),
    out: Path = typer.Option(None, help="write an HTML report here"),
):
    """Activation patching between a CLEAN and a CORRUPTED image (denoising, recovery of the
    target class's logit)."""
    import torch

    import patchlens as pl
    from patchlens.report import Report

    _check_files([clean, corrupted])
    m = _load(model)
    x = _guard(m.preprocess, [str(clean), str(corrupted)])
    with torch.inference_mode():
        cls = int(m(x[:1]).argmax()) if target is None else target
    metric = pl.metrics.recovery(pl.metrics.logit(cls))
    res = _guard(pl.activation_patching, m, x[:1], x[1:], metric, site=site, per=per)
    typer.echo(repr(res))
    typer.echo(res.top(5).to_string(index=False))
    if out:
        path = Report(f"activation patching: {clean.name} -> {corrupted.name}").figure(res.plot()).save(out)
        typer.echo(f"report: {path}")


@app.command()
def caap(
    images: list[Path] = typer.Argument(..., help="image files"),
    model: str = typer.Option("clutter-digits-vit", help="model name"),
    layers: str = typer.Option(None, help="layer window a:b (default: the method's default)"),
    context: str = typer.Option("blur", help="blur | mean | zeros | noise"),
    out: Path = typer.Option(Path("caap-report.html"), help="HTML report path"),
):
    """CAAP attribution maps for IMAGES, written to an HTML report."""
    import patchlens as pl
    from patchlens.report import Report

    _check_files(images)
    m = _load(model)
    x = _guard(m.preprocess, [str(p) for p in images])
    kwargs = {"context": context}
    if layers:
        kwargs["layers"] = _layers(layers, m.cfg.n_layers)
    amap = _guard(pl.caap, m, x, **kwargs)
    typer.echo(repr(amap))
    report = Report("CAAP attribution")
    for i, p in enumerate(images):
        report.figure(amap.plot(i), p.name)
    typer.echo(f"report: {report.save(out)}")


@app.command()
def bench(
    which: str = typer.Argument("forward", help="forward | patching | caap | attribution | diagnostics | scale"),
    args: list[str] = typer.Argument(None, help="arguments passed to the benchmark script"),
):
    """Run a benchmark script from benchmarks/ (ratios measured in one run)."""
    import runpy

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"{which}.py"
    if not script.exists():
        _fail(f"no benchmark {which!r} (looked for {script}); the benchmarks live in a source "
              "checkout of patchlens")
    sys.argv = [str(script), *(args or [])]
    sys.path.insert(0, str(root))
    runpy.run_path(str(script), run_name="__main__")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context):
    """Dataset-scale sharded, resumable runs (see docs/scaling.md); arguments as for
    `python -m patchlens.run --help`."""
    try:
        from patchlens.run import cli_main
    except ImportError:
        _fail("patchlens.run is not available in this installation")
    raise typer.Exit(code=cli_main(list(ctx.args)))


def main() -> None:  # pragma: no cover
    sys.exit(app())
