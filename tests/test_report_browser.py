"""The demo's HTML report, rendered in headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """The demo on 2 images: the report's path and what it printed (stdout not a terminal)."""
    from patchlens.demo import run_demo

    out = tmp_path_factory.mktemp("report") / "report.html"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_demo(out=out, n_images=2)
    assert Path(summary["report"]) == out.resolve()
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def report_path(demo_run) -> Path:
    return demo_run[0]


def test_demo_names_each_step_when_piped(demo_run):
    lines = demo_run[1].splitlines()
    steps = [line for line in lines if line.startswith("[")]
    assert [s.split("]")[0] + "]" for s in steps] == [f"[{i}/9]" for i in range(1, 10)]
    for name in ("predictions", "activation patching", "path patching", "circuit", "CAAP",
                 "divergence", "sparse-autoencoder", "writing the report"):
        assert sum(name in s for s in steps) == 1, name
    assert lines.index(steps[-1]) < next(i for i, line in enumerate(lines) if "report:" in line)


def test_report_is_self_contained(report_path):
    html = report_path.read_text()
    assert "<script" in html and "Plotly.newPlot" in html
    assert 'src="http' not in html and "src='http" not in html  # nothing fetched from outside
    assert html.count('class="plotly-graph-div"') >= 4


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed and could not be "
                    "installed by tools/ensure_chromium.sh (needs root and apt-get)")
def test_report_renders_in_chromium(report_path):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report_path.resolve().as_uri())
            page.wait_for_load_state("load")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.plotly-graph-div')].every("
                "d => d.querySelector('svg.main-svg'))", timeout=30000)
            n_divs = page.locator(".plotly-graph-div").count()
            drawn = page.evaluate(
                "() => [...document.querySelectorAll('.plotly-graph-div')].filter("
                "d => d.querySelectorAll('svg.main-svg').length > 0 && "
                "d.getBoundingClientRect().height > 50).length")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert n_divs >= 4
    assert drawn == n_divs
    assert errors == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
