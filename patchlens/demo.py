"""The main job (`patchlens demo`): a short, real study on a model, written to one HTML report.

Predictions, an activation-patching sweep, a path-patching sweep, CAAP maps next to baselines
with deletion/insertion scores, and the divergence of the interventions; a summary on the
terminal and a self-contained HTML report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _pairs_from_zoo(model, n: int, seed: int):
    """Clutter-digit images (clean) and the same images with the digit erased (corrupted)."""
    from patchlens.zoo.clutter_digits import erase_digits, generate

    data = generate(n, split="test", seed=seed, image_size=model.cfg.image_size[0])
    return data.images, erase_digits(data), data.labels, data


def _pairs_from_paths(model, paths: Sequence[str]):
    """User images (clean) and a strong Gaussian blur of them (corrupted)."""
    import torchvision.transforms.v2.functional as TF

    clean = model.to_image(model.preprocess(list(paths))).cpu()
    k = max(3, (min(clean.shape[-2:]) // 8) | 1)
    corrupt = TF.gaussian_blur(clean, [k, k], [k / 3.0, k / 3.0])
    return clean, corrupt, None, None


def run_demo(model_name: str = "clutter-digits-vit", images: Sequence[str] | None = None,
             out: str | Path = "patchlens-report.html", n_images: int = 4, seed: int = 0,
             quiet: bool = False, plotlyjs: str = "inline") -> dict[str, Any]:
    """Run the study and write the report; returns a summary dict (numbers and the path).

    Prints each step's name as it starts (also when stdout is not a terminal), then a summary
    table; ``quiet`` prints nothing. ``plotlyjs``: ``"inline"`` (offline report) or ``"cdn"``."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import patchlens as pl
    from patchlens.errors import InputError
    from patchlens.report import Report

    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 1:
        raise InputError(f"n_images must be a positive int (the number of zoo images), got "
                         f"{n_images!r}.")
    console = Console(quiet=quiet)
    t_start = time.perf_counter()
    steps = ["loading the model and images", "predictions",
             "activation patching (layer x token, layer x head)",
             "path patching (every head -> logits)", "CAAP and two baselines, deletion/insertion",
             "divergence of the interventions", "writing the report"]
    with Progress(console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("study", total=len(steps))

        def step(i: int) -> None:
            """Name the step on the bar and as a line (flushed: shown when piped too)."""
            if i > 0:
                progress.advance(task)
            progress.update(task, description=steps[i])
            console.print(f"[{i + 1}/{len(steps)}] {steps[i]} "
                          f"({time.perf_counter() - t_start:.0f} s)", highlight=False)

        step(0)
        model = pl.HookedViT.from_pretrained(model_name)
        cfg = model.cfg
        if images:
            clean_img, corrupt_img, labels, data = _pairs_from_paths(model, images)
        else:
            clean_img, corrupt_img, labels, data = _pairs_from_zoo(model, n_images, seed)
        clean, corrupted = model.preprocess(clean_img), model.preprocess(corrupt_img)
        summary: dict[str, Any] = {"model": model_name, "n_images": clean.shape[0]}
        report = Report(f"patchlens study: {model_name}")
        report.text(f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, patch "
                    f"grid {cfg.grid_size[0]}x{cfg.grid_size[1]}, prefix tokens "
                    f"{list(model.layout.prefix)}; {clean.shape[0]} images. Corrupted inputs: "
                    + ("the digit erased (filled with the median background colour)."
                       if data is not None else "a strong Gaussian blur of each image."))

        # 1. predictions
        step(1)
        with torch.inference_mode():
            logits = model(clean)
        probs = logits.softmax(-1)
        pred = logits.argmax(-1)
        rows = [{"image": i, "label": "" if labels is None else int(labels[i]),
                 "predicted": int(pred[i]), "probability": float(probs[i, pred[i]])}
                for i in range(clean.shape[0])]
        if labels is not None:
            summary["accuracy"] = float((pred == labels).float().mean())
        report.heading("Predictions").table(rows)
        report.figure(_image_strip(clean_img, corrupt_img), "Top: clean inputs. Bottom: corrupted.")

        # 2. activation patching (denoising, normalised recovery of the predicted class)
        step(2)
        metric = pl.metrics.recovery(pl.metrics.logit(pred))
        act = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre",
                                     per="token", progress=False)
        heads = pl.activation_patching(model, clean, corrupted, metric, per="head", progress=False)
        summary["activation_top"] = act.top(3).to_dict(orient="records")
        report.heading("Activation patching (residual stream, denoising)")
        report.text("Clean activations patched into the corrupted run one (layer, token) at a time; "
                    "values are the normalised recovery of the predicted class's logit (1 = fully "
                    "restored).")
        report.figure(act.plot(), "layer x token")
        report.figure(act.plot(kind="grid", image=clean_img[0]), "maps over the first image")
        report.figure(heads.plot(), "layer x head (head outputs, all tokens)")
        report.table(act.top(5), "largest effects")

        # 3. path patching: direct effect of every head on the logits
        step(3)
        path = pl.path_patching(model, clean, corrupted, pl.all_heads(model),
                                pl.Node("resid_final"), pl.metrics.logit(pred), normalize=True,
                                progress=False)
        summary["path_top"] = path.top(3).to_dict(orient="records")
        report.heading("Path patching (every head -> logits, direct path)")
        report.figure(path.plot(), "normalised direct effect")

        # 4. CAAP and baselines, with deletion / insertion
        step(4)
        caap_rows = _attribution_section(model, clean, pred, clean_img, report)
        if caap_rows:
            summary["attribution"] = caap_rows

        # 5. divergence of the interventions
        step(5)
        div = _divergence_section(model, clean, corrupted, metric, report, seed)
        if div:
            summary["divergence"] = div

        step(6)
        path_out = report.save(out, plotlyjs=plotlyjs)
        progress.advance(task)
    summary["report"] = str(path_out.resolve())
    summary["seconds"] = round(time.perf_counter() - t_start, 1)

    table = Table(title=f"patchlens demo: {model_name}")
    table.add_column("step")
    table.add_column("result")
    if "accuracy" in summary:
        table.add_row("predictions", f"accuracy {summary['accuracy']:.2f} on {clean.shape[0]} images")
    top = summary["activation_top"][0]
    table.add_row("activation patching", f"largest recovery {top['value']:.2f} at layer "
                  f"{top['layer']}, token {top['token']}")
    ptop = summary["path_top"][0]
    table.add_row("path patching", f"largest direct effect {ptop['value']:.2f} at head "
                  f"{ptop['layer']}.{ptop['head']}")
    for row in summary.get("attribution", []):
        table.add_row(f"attribution: {row['method']}",
                      f"deletion {row['deletion']:.3f}, insertion {row['insertion']:.3f}")
    if summary.get("divergence"):
        table.add_row("divergence", str(summary["divergence"]))
    console.print(table)
    console.print(f"report: {summary['report']}  ({summary['seconds']} s)")
    return summary


def _image_strip(clean: Tensor, corrupt: Tensor):
    import plotly.express as px

    imgs = torch.cat([clean, corrupt]).permute(0, 2, 3, 1).clamp(0, 1).numpy()
    fig = px.imshow(imgs, facet_col=0, facet_col_wrap=clean.shape[0], height=320)
    fig.for_each_annotation(lambda a: a.update(text=""))
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    return fig


def _attribution_section(model, clean, pred, clean_img, report) -> list[dict]:
    from patchlens.attribution import METHODS
    from patchlens.attribution.metrics import deletion, insertion

    report.heading("Attribution: CAAP next to two baselines")
    rows = []
    step = max(1, model.layout.n_patches // 16)  # 16 deletion / insertion steps
    for name in ("caap", "chefer", "rollout"):
        kw = {"progress": False} if name == "caap" else {}  # the demo prints its own steps
        amap = METHODS[name](model, clean, target=pred, **kw)
        rows.append({"method": name,
                     "deletion": float(deletion(model, clean, amap, target=pred, step=step).mean()),
                     "insertion": float(insertion(model, clean, amap, target=pred, step=step).mean())})
        report.figure(amap.plot(0), f"{name} on the first image")
    report.table(rows, "deletion AUC (lower is better) and insertion AUC (higher is better), "
                 "probability of the predicted class")
    return rows


def _divergence_section(model, clean, corrupted, metric, report, seed) -> str | None:
    import patchlens as pl
    from patchlens.diagnostics import Reference

    natural = _natural_images(model, seed)
    if natural is None:
        report.heading("Divergence of the interventions")
        report.text("Skipped: the divergence reference needs natural images from the model's "
                    "training distribution; use patchlens.diagnostics.Reference.fit with your own.")
        return None
    ref = Reference.fit(model, natural, ["resid_pre"], max_samples=3000, progress=False)
    res = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre", per="layer",
                                 diagnose=ref, progress=False)
    report.heading("Divergence of the interventions")
    report.text(res.divergence.summary())
    report.figure(res.divergence.plot())
    report.table(res.divergence.to_pandas())
    return res.divergence.summary()


def _natural_images(model, seed: int) -> Tensor | None:
    """Natural images for the divergence reference: clutter-digits training images for the zoo
    models (None for other models: the section is skipped and the report says so)."""
    from patchlens.zoo.clutter_digits import generate

    if tuple(model.cfg.image_size) != (64, 64) or model.cfg.n_classes != 10:
        return None
    return model.preprocess(generate(256, split="train", seed=seed + 1).images)
