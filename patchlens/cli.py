"""The ``patchlens`` command: demo, caap, patch, hooks, zoo, bench, run.

Errors a user can cause (a missing file, an unknown model, an unreadable image, an unwritable
``--out``, a full disk) print one ``error:`` line and exit with code 2, never a traceback (see
`patchlens.cli_errors`). Help texts are single lines per paragraph: rich wraps them to the
terminal.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from patchlens.cli_errors import USER_ERROR_EXIT, check_output_file, user_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="patchlens: hooked Vision Transformers and causal interventions.")

# name -> what the script in benchmarks/ measures (the only names `patchlens bench` runs)
BENCHMARKS = {
    "forward": "HookedViT forward cost against the source timm model",
    "patching": "a layer x token sweep: the engine against a naive loop and the compute floor",
    "path": "path patching of every head to the logits against a naive per-sender loop",
    "per_image": "per-image token selections against a per-image loop and a shared selection",
    "caap": "cost of one CAAP map of a 224 px image",
    "attribution": "every attribution method's localisation and faithfulness on clutter-digits",
    "diagnostics": "cost of divergence diagnostics against a plain sweep",
    "divergence_calibration": "false-alarm and detection rates of the divergence verdict on the zoo models",
    "circuits": "EAP / EAP-IG / exact edge scores against a forward pass, a naive loop and the floor",
    "sae": "spliced-forward cost and a per-feature sweep against a naive loop",
    "das": "DAS training time to convergence and its interchange-intervention accuracy",
    "scale": "`patchlens run` throughput on 2 processes against 1",
}


class PlotlyJS(str, Enum):
    inline = "inline"
    cdn = "cdn"


class PerChoice(str, Enum):
    token = "token"
    head = "head"
    head_token = "head_token"
    layer = "layer"


PLOTLYJS_HELP = ("How the report gets plotly.js: inline (~4.8 MB per report, opens offline) or "
                 "cdn (a small file that loads plotly.js from cdn.plot.ly when opened).")
FORCE_HELP = "Overwrite --out if it exists (without it, an existing report is never replaced)."


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=USER_ERROR_EXIT)


def _guard(fn, *args, writing: Path | None = None, **kwargs):
    """Run ``fn``, turning user errors into one ``error:`` line and exit code 2 (``writing``:
    the output path, named in messages about failed writes)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        msg = user_error(e, writing)
        if msg is None:
            raise
        _fail(msg)


def _check_files(paths: list[Path]) -> None:
    for p in paths:
        if not p.exists():
            _fail(f"file not found: {p}")
        if p.is_dir():
            _fail(f"{p} is a directory; pass image files")


def _check_out(out: Path, force: bool) -> Path:
    """Refuse an output path that cannot be written, before any work."""
    return _guard(check_output_file, out, force=force)


def _load(name: str):
    from patchlens.run.inputs import load_model

    return _guard(load_model, name)


def _layers(spec: str, n: int) -> tuple[int, int]:
    from patchlens.run.cli import parse_layers

    return _guard(parse_layers, spec, n)


def _save(report, out: Path, plotlyjs: PlotlyJS) -> Path:
    return _guard(report.save, out, plotlyjs=plotlyjs.value, writing=out)


MODEL_HELP = "A zoo, timm or Hugging Face model name, or a zoo-format record .json."


@app.command(short_help="Run the main study on the zoo model (or yours) and write an HTML report.", help="Run the main study on a model: predictions, activation and path patching, CAAP next to two baselines, and the divergence of the interventions. Prints each step as it starts, then a summary table, and writes one self-contained HTML report (overwriting --out).")
def demo(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "clutter-digits-vit",
    images: Annotated[list[Path] | None, typer.Option("--images", show_default=False, help="Image files to study (default: generated zoo images; corrupted inputs are then a strong blur of each image).")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the HTML report.")] = Path("patchlens-report.html"),
    n: Annotated[int, typer.Option(help="Number of zoo images when --images is not given (at least 1).")] = 4,
    plotlyjs: Annotated[PlotlyJS, typer.Option(help=PLOTLYJS_HELP)] = PlotlyJS.inline,
):
    from patchlens.demo import run_demo

    if images:
        _check_files(images)
    if n < 1:
        _fail(f"--n must be at least 1 (the number of zoo images), got {n}")
    _check_out(out, force=True)
    _guard(run_demo, model, [str(p) for p in images] if images else None, out, n,
           plotlyjs=plotlyjs.value, writing=out)


@app.command(short_help="Print the hook points of a model.", help="Print the hook points of MODEL: every hook name in full, its activation shape on one image and its axes.")
def hooks(model: Annotated[str, typer.Argument(help=MODEL_HELP)] = "clutter-digits-vit"):
    m = _load(model)
    from rich.console import Console
    from rich.table import Table

    rows = m.hook_table()
    table = Table(title=f"hook points of {model}", title_justify="left")
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    table.add_column("shape", overflow="fold")
    table.add_column("axes", overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["shape"], row["axes"])
    console = Console()
    console.print(table)
    console.print("Shapes are measured on one image with the opt-in hooks switched on "
                  "(use_attn_result: hook_result; use_split_qkv_input: hook_q_input, "
                  "hook_k_input, hook_v_input, and ln1 then runs per head). Without those "
                  "switches these hooks do not fire; switch them on with model.options(...).",
                  highlight=False)


@app.command(help="List the embedded (offline) zoo models.")
def zoo():
    from patchlens import zoo as zoo_mod

    for name, desc in zoo_mod.list():
        typer.echo(f"{name:32s} {desc}")


SITE_HINT = (" Sites are short hook names (resid_pre, attn_out, mlp_out, z, ...); run "
             "`patchlens hooks {model}` to list the model's hook points.")


@app.command(short_help="Activation patching between a clean and a corrupted image.", help="Activation patching between a CLEAN and a CORRUPTED image: clean activations are patched into the corrupted run one site at a time (denoising), measuring the recovery of the target class's logit.")
def patch(
    clean: Annotated[Path, typer.Argument(show_default=False, help="The clean image.")],
    corrupted: Annotated[Path, typer.Argument(show_default=False, help="The corrupted image.")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "clutter-digits-vit",
    site: Annotated[str | None, typer.Option(show_default=False, help="Site short name; default resid_pre, or z for --per head / head_token. `patchlens hooks` lists the hook points.")] = None,
    per: Annotated[PerChoice, typer.Option(help="One patched run per layer x token, layer x head (all tokens), layer x head x token, or layer.")] = PerChoice.token,
    target: Annotated[int | None, typer.Option(show_default=False, help="Class to measure (default: the prediction on the clean image).")] = None,
    out: Annotated[Path | None, typer.Option(show_default=False, help="Write an HTML report of the sweep here.")] = None,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    plotlyjs: Annotated[PlotlyJS, typer.Option(help=PLOTLYJS_HELP)] = PlotlyJS.inline,
):
    import torch

    import patchlens as pl
    from patchlens.errors import UnknownHookError
    from patchlens.report import HtmlReport

    _check_files([clean, corrupted])
    if out:
        _check_out(out, force)
    m = _load(model)
    x = _guard(m.preprocess, [str(clean), str(corrupted)])
    with torch.inference_mode():
        cls = int(m(x[:1]).argmax()) if target is None else target
    metric = pl.metrics.recovery(pl.metrics.logit(cls))
    try:
        res = pl.activation_patching(m, x[:1], x[1:], metric, site=site, per=per.value)
    except UnknownHookError as e:
        _fail(user_error(e) + SITE_HINT.format(model=model))
    except Exception as e:
        msg = user_error(e)
        if msg is None:
            raise
        _fail(msg)
    typer.echo(repr(res))
    typer.echo(res.top(5).to_string(index=False))
    if out:
        report = HtmlReport(f"activation patching: {clean.name} -> {corrupted.name}").figure(res.plot())
        typer.echo(f"report: {_save(report, out, plotlyjs)}")


def caap_summary(amap, names: list[str]) -> str:
    """A few lines describing CAAP maps: the run's settings, then per image the target class,
    the range of the map and its top patch."""
    meta = amap.meta or {}
    gh, gw = amap.grid
    settings = ", ".join(f"{k} {meta[k]}" for k in ("layers", "context", "site", "score")
                         if k in meta)
    lines = [f"CAAP maps of {len(names)} image(s), patch grid {gh}x{gw}"
             + (f" ({settings})" if settings else "")]
    width = max(len(n) for n in names)
    for i, name in enumerate(names):
        v = amap.values[i].float()
        r, c = divmod(int(v.argmax()), gw)
        lines.append(f"  {name:<{width}}  class {int(amap.target[i])}: map from "
                     f"{float(v.min()):.3g} to {float(v.max()):.3g}, top patch row {r}, "
                     f"col {c}")
    return "\n".join(lines)


@app.command(short_help="CAAP attribution maps of images, as a summary and an HTML report.", help="CAAP attribution maps for IMAGES: prints a summary per image and writes the maps over the images to an HTML report (never overwriting one without --force).")
def caap(
    images: Annotated[list[Path], typer.Argument(show_default=False, help="Image files.")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "clutter-digits-vit",
    layers: Annotated[str | None, typer.Option(show_default=False, help="Layer window a:b (either side may be empty); default: the method's default.")] = None,
    context: Annotated[str, typer.Option(help="What replaces the masked patches: blur, mean, zeros or noise.")] = "blur",
    out: Annotated[Path, typer.Option(help="HTML report path.")] = Path("caap-report.html"),
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
    plotlyjs: Annotated[PlotlyJS, typer.Option(help=PLOTLYJS_HELP)] = PlotlyJS.inline,
):
    import patchlens as pl
    from patchlens.report import HtmlReport

    _check_files(images)
    _check_out(out, force)
    m = _load(model)
    x = _guard(m.preprocess, [str(p) for p in images])
    kwargs = {"context": context}
    if layers:
        kwargs["layers"] = _layers(layers, m.cfg.n_layers)
    amap = _guard(pl.caap, m, x, **kwargs)
    typer.echo(caap_summary(amap, [p.name for p in images]))
    report = HtmlReport("CAAP attribution")
    for i, p in enumerate(images):
        report.figure(amap.plot(i), p.name)
    typer.echo(f"report: {_save(report, out, plotlyjs)}")


@app.command(short_help="Run a benchmark from benchmarks/ (ratios measured in one run).", help="Run a benchmark script from benchmarks/ (in a source checkout); each prints ratios measured in one run. Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()) + ".")
def bench(
    which: Annotated[str, typer.Argument(help="Benchmark name: " + ", ".join(BENCHMARKS) + ".")] = "forward",
    args: Annotated[list[str] | None, typer.Argument(show_default=False, help="Arguments passed to the benchmark script (see its --help).")] = None,
):
    import runpy

    if which not in BENCHMARKS:
        _fail(f"unknown benchmark {which!r}; the benchmarks are: {', '.join(BENCHMARKS)}")
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"{which}.py"
    if not script.is_file():
        _fail(f"benchmark {which!r} is not here ({script} is missing): the benchmarks live in a "
              "source checkout of patchlens")
    sys.argv = [str(script), *(args or [])]
    sys.path.insert(0, str(root))
    runpy.run_path(str(script), run_name="__main__")


def _register_run() -> None:
    from patchlens.run.cli import HELP, run_command

    app.command(name="run", help=HELP, no_args_is_help=True,
                short_help="Map a recipe over a dataset into resumable shards (one or many "
                "processes).")(run_command)


_register_run()


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m patchlens.cli ...
    main()
