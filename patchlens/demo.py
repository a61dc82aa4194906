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
             quiet: bool = False) -> dict[str, Any]:
    """Run the study and write the report; returns a summary dict (numbers and the path)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import patchlens as pl
    from patchlens.report import Report

    console = Console(quiet=quiet)
    t_start = time.perf_counter()
    model = pl.HookedViT.from_pretrained(model_name)
    cfg = model.cfg
    if images:
        clean_img, corrupt_img, labels, data = _pairs_from_paths(model, images)
    else:
        clean_img, corrupt_img, labels, data = _pairs_from_zoo(model, n_images, seed)
    clean, corrupted = model.preprocess(clean_img), model.preprocess(corrupt_img)
    summary: dict[str, Any] = {"model": model_name, "n_images": clean.shape[0]}
    report = Report(f"patchlens study: {model_name}")
    report.text(f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, patch grid "
                f"{cfg.grid_size[0]}x{cfg.grid_size[1]}, prefix tokens {list(model.layout.prefix)}; "
                f"{clean.shape[0]} images. Corrupted inputs: "
                + ("the digit erased (filled with the median background colour)." if data is not None
                   else "a strong Gaussian blur of each image."))

    steps = ["predictions", "activation patching", "path patching", "CAAP and baselines",
             "divergence", "SAE features"]
    with Progress(console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("study", total=len(steps))

        # 1. predictions
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
        progress.advance(task)

        # 2. activation patching (denoising, normalised recovery of the predicted class)
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
        progress.advance(task)

        # 3. path patching: direct effect of every head on the logits
        path = pl.path_patching(model, clean, corrupted, pl.all_heads(model),
                                pl.Node("resid_final"), pl.metrics.logit(pred), normalize=True,
                                progress=False)
        summary["path_top"] = path.top(3).to_dict(orient="records")
        report.heading("Path patching (every head -> logits, direct path)")
        report.figure(path.plot(), "normalised direct effect")
        progress.advance(task)

        # 4. CAAP and baselines, with deletion / insertion
        caap_rows = _attribution_section(model, clean, pred, clean_img, report)
        if caap_rows:
            summary["attribution"] = caap_rows
        progress.advance(task)

        # 5. divergence of the interventions
        div = _divergence_section(model, clean, corrupted, metric, report, seed)
        if div:
            summary["divergence"] = div
        progress.advance(task)

        # 6. sparse-autoencoder features (models with a zoo SAE)
        sae = _sae_section(model, model_name, clean, report)
        if sae:
            summary["sae"] = sae
        progress.advance(task)

    path_out = report.save(out)
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
    if summary.get("sae"):
        q = summary["sae"]["quality"]
        table.add_row("SAE features", f"{summary['sae']['hook']}: fve {q['fve']:.3f}, top "
                      f"feature {summary['sae']['top_features'][0]['feature']}")
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
        amap = METHODS[name](model, clean, target=pred)
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


def _sae_section(model, model_name: str, clean, report) -> dict | None:
    from patchlens.sae import load, zoo_sae_info, zoo_saes
    from patchlens.sae.report import sae_section

    names = [e.name for e in zoo_saes()
             if zoo_sae_info(e.name)["model"] == model_name.removeprefix("zoo:")]
    if not names:
        report.heading("Sparse-autoencoder features")
        report.text("Skipped: no SAE for this model in the zoo; train one with "
                    "patchlens.sae.train or load one with patchlens.sae.load.")
        return None
    return sae_section(report, model, clean, load(names[0]))


def _natural_images(model, seed: int) -> Tensor | None:
    """Natural images for the divergence reference: clutter-digits training images for the zoo
    models (None for other models: the section is skipped and the report says so)."""
    from patchlens.zoo.clutter_digits import generate

    if tuple(model.cfg.image_size) != (64, 64) or model.cfg.n_classes != 10:
        return None
    return model.preprocess(generate(256, split="train", seed=seed + 1).images)
