"""Render patchlens's figures to PNG in headless Chromium, to look at them.

    PYTHONPATH=$PWD .venv/bin/python tools/render_figures.py OUT_DIR [--only NAME ...]

Builds each figure on the zoo model (activation patching, heads, path patching, CAAP, the
divergence report), writes it as HTML (plotly.js inlined) and screenshots it with Playwright
driving Debian's chromium (no kaleido needed). Sliders are moved with ``--step`` to check that
titles follow them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def figures(only: set[str] | None):
    import patchlens as pl
    from patchlens.zoo.clutter_digits import erase_digits, generate

    torch.manual_seed(0)
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    data = generate(4, split="test", seed=3)
    clean, corrupted = model.preprocess(data.images), model.preprocess(erase_digits(data))
    metric = pl.metrics.recovery(pl.metrics.logit(data.labels))
    out = {}

    def want(name):
        return only is None or name in only

    if want("tokens") or want("grid") or want("divergence"):
        act = pl.activation_patching(model, clean, corrupted, metric, progress=False)
        out["tokens"] = act.plot()
        out["grid"] = act.plot(kind="grid")
        out["grid_scaled"] = act.plot(kind="grid", per_image_scale=True)
    if want("heads"):
        out["heads"] = pl.activation_patching(model, clean, corrupted, metric, per="head",
                                              progress=False).plot()
    if want("layer"):
        raw = pl.activation_patching(model, clean, corrupted, pl.metrics.logit(data.labels),
                                     per="layer", progress=False)
        out["layer"] = raw.plot()
    if want("path"):
        out["path"] = pl.path_patching(model, clean, corrupted, pl.all_heads(model),
                                       pl.Node("resid_final"), pl.metrics.logit(data.labels),
                                       progress=False).plot()
    if want("caap"):
        out["caap"] = pl.caap(model, clean, progress=False).plot(None)
    if want("divergence"):
        from patchlens.diagnostics import Reference

        ref = Reference.fit(model, model.preprocess(generate(64, split="test", seed=9).images),
                            sites=["resid_pre"])
        res = pl.activation_patching(model, clean, corrupted, metric, per="layer",
                                     progress=False, diagnose=ref)
        out["divergence_layer"] = res.divergence.plot()
        res = pl.activation_patching(model, clean, corrupted, metric, layers=[1, 3],
                                     progress=False, diagnose=ref)
        out["divergence_tokens"] = res.divergence.plot()
    return out


def screenshot(html: Path, png: Path, step: int | None, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(html.resolve().as_uri())
            page.wait_for_function("() => document.querySelector('svg.main-svg')")
            if step is not None:
                page.evaluate(  # what a click on slider step s does
                    "s => { const d = document.querySelector('.plotly-graph-div');"
                    " const n = d.layout.sliders ? d.layout.sliders[0].steps.length : 0;"
                    " if (n) { const st = d.layout.sliders[0].steps[Math.min(s, n - 1)];"
                    " Plotly.update(d, st.args[0], st.args[1]);"
                    " Plotly.relayout(d, {'sliders[0].active': Math.min(s, n - 1)}); } }", step)
                page.wait_for_timeout(500)
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--step", type=int, default=None, help="move every slider to this step")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (tools/ensure_chromium.sh)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures(set(args.only) if args.only else None).items():
        html = out / f"{name}.html"
        fig.write_html(html, include_plotlyjs=True, full_html=True)
        suffix = "" if args.step is None else f"_step{args.step}"
        screenshot(html, out / f"{name}{suffix}.png", args.step, chromium)
        print(out / f"{name}{suffix}.png")


if __name__ == "__main__":
    main()
