"""The main job (`patchlens demo`): a short, real study on a model, written to one HTML report.

Predictions, an activation-patching sweep, a path-patching sweep, a circuit (EAP and EAP-IG
edge scores, faithfulness curves, the smallest EAP-IG circuit keeping 80%), CAAP maps next to
baselines with deletion/insertion scores, and the divergence of the interventions; a summary on the
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
    from patchlens.report import HtmlReport

    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 1:
        raise InputError(f"n_images must be a positive int (the number of zoo images), got "
                         f"{n_images!r}.")
    console = Console(quiet=quiet)
    t_start = time.perf_counter()
    steps = ["loading the model and images", "predictions",
             "activation patching (layer x token, layer x head)",
             "path patching (every head -> logits)",
             "circuit (EAP and EAP-IG edge scores, faithfulness curves)",
             "CAAP and two baselines, deletion/insertion",
             "divergence of the interventions", "sparse-autoencoder features",
             "writing the report"]
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
        report = HtmlReport(f"patchlens study: {model_name}")
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

        # 4. circuit: EAP and EAP-IG edge scores, faithfulness curves, a circuit
        step(4)
        summary["circuit"] = _circuit_section(model, clean, corrupted, pl.metrics.logit(pred),
                                              report)

        # 5. CAAP and baselines, with deletion / insertion
        step(5)
        caap_rows = _attribution_section(model, clean, pred, clean_img, report)
        if caap_rows:
            summary["attribution"] = caap_rows

        # 6. divergence of the interventions
        step(6)
        div = _divergence_section(model, model_name, clean, corrupted, metric, report, seed)
        if div:
            summary["divergence"] = div

        # 7. sparse-autoencoder features (models with a zoo SAE)
        step(7)
        sae = _sae_section(model, model_name, clean, report)
        if sae:
            summary["sae"] = sae

        step(8)
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
    circ = summary["circuit"]
    table.add_row("circuit", f"{circ['edges']} of {circ['graph_edges']} edges, faithfulness "
                  f"{circ['faithfulness']:.2f}")
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


def _circuit_section(model, clean, corrupted, metric, report) -> dict[str, Any]:
    """EAP and EAP-IG over every edge, both methods' faithfulness curves (corrupted ablation),
    and the smallest EAP-IG top-k circuit on the curve that keeps 80% of the behaviour."""
    from patchlens import circuits

    graph = circuits.Graph.from_model(model, tuple(clean.shape[-2:]))
    scores = [circuits.edge_scores(model, clean, corrupted, metric, method=m, graph=graph)
              for m in ("eap", "eap-ig")]
    ks = sorted({max(1, round(f * graph.n_edges)) for f in (0.01, 0.05, 0.1, 0.2, 0.35, 0.5)})
    curve = circuits.faithfulness_curve(model, scores, clean, corrupted, metric, ks=ks,
                                        n_random=1, progress=False)
    ok = [k for k, f in zip(ks, curve.values["eap-ig"].tolist()) if f >= 0.8]
    k = ok[0] if ok else ks[-1]
    circuit = circuits.Circuit.top_k(scores[1], k)
    ev = circuits.evaluate(model, circuit, clean, corrupted, metric, progress=False)
    report.circuit(circuit, ev, curve, title=f"Circuit (EAP-IG, top {k} edges: the smallest "
                   "on the curve that keeps 80% of the behaviour)")
    return {"edges": circuit.n_edges, "graph_edges": graph.n_edges,
            "faithfulness": ev.faithfulness, "area": curve.area}


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


def _divergence_section(model, model_name, clean, corrupted, metric, report,
                        seed) -> str | None:
    import patchlens as pl
    from patchlens.diagnostics import RECOMMENDED_IMAGES, Reference, diagnose
    from patchlens.patching import Interchange, Scale, Site, Variant, Zero

    natural = _natural_images(model, model_name, seed)
    if natural is None:
        report.heading("Divergence of the interventions")
        report.text("Skipped: the divergence reference needs natural images from the model's "
                    "training distribution; use patchlens.diagnostics.Reference.fit with your own.")
        return None
    ref = Reference.fit(model, natural, ["resid_pre"], progress=False)
    res = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre", per="layer",
                                 diagnose=ref, progress=False)
    report.heading("Divergence of the interventions")
    report.text(f"Reference: {RECOMMENDED_IMAGES} natural training images. A patched vector is "
                "an outlier when at most 1% of natural vectors (of other images) are as unusual; "
                "a site is divergent when more than half of its patched vectors are.")
    report.text(res.divergence.summary())
    report.figure(res.divergence.plot())
    report.table(res.divergence.to_pandas()[["label", "hook", "class", "n", "outlier_rate",
                                             "n_dormant", "verdict", "evidence"]])
    # controls whose answer is known (the calibration cases of docs/divergence.md)
    mid = model.cfg.n_layers // 2
    controls = [("patch all of layer 0 from clean: the clean run itself", "natural",
                 Site("resid_pre", layers=0), Interchange(clean, "clean")),
                ("self-patch of every token", "natural",
                 Site("resid_pre", layers=mid), Interchange(corrupted, "self")),
                ("zero ablation of the patch tokens", "divergent",
                 Site("resid_pre", layers=mid, tokens="patches"), Zero()),
                ("patch tokens scaled x10", "divergent",
                 Site("resid_pre", layers=mid, tokens="patches"), Scale(10.0))]
    rep = diagnose(model, corrupted, [Variant([(s, iv)], name) for name, _, s, iv in controls],
                   ref)
    verdicts = rep.variant_verdicts()
    report.table([{"control": name, "expected": want, "verdict": v,
                   "evidence": next(r["evidence"] for r in rep.rows if r["variant"] == i
                                    and r["verdict"] == v)}
                  for i, ((name, want, _, _), v) in enumerate(zip(controls, verdicts))],
                 "interventions whose answer is known")
    try:
        from patchlens.diagnostics.calibration import overall, zoo_counts

        table = overall(zoo_counts())
        mine = table[table["model"] == model_name]
        report.table(mine if len(mine) else table,
                     "calibration on the zoo models (benchmarks/divergence_calibration.py): % of "
                     "known-natural cases called divergent, % of known-divergent cases detected")
    except Exception:  # a build without the calibration table
        pass
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


def _natural_images(model, model_name: str, seed: int) -> Tensor | None:
    """Natural images for the divergence reference: clutter-digits training images for the zoo
    models (None for other models: the section is skipped and the report says so)."""
    from patchlens.diagnostics import RECOMMENDED_IMAGES
    from patchlens.zoo.clutter_digits import generate

    if tuple(model.cfg.image_size) != (64, 64) or model.cfg.n_classes != 10:
        return None
    shortcut = "train" if "shortcut" in model_name else None  # its training distribution
    return model.preprocess(generate(RECOMMENDED_IMAGES, split="train", seed=seed + 1,
                                     shortcut=shortcut).images)
