"""Figures: titles that fit, axis titles, titled colour bars, 0-centred diverging scales for
effects, per-image overlays with an image slider whose title follows it."""

from __future__ import annotations

import pytest
import torch

import patchlens as pl
from patchlens import viz
from patchlens.errors import InputError


@pytest.fixture(scope="module")
def results():
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=48, image_size=32,
                       patch_size=8, n_classes=5)
    torch.manual_seed(0)
    model = pl.HookedViT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    metric = pl.metrics.logit_diff(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0]))
    tokens = pl.activation_patching(model, clean, corrupted, metric, progress=False)
    heads = pl.activation_patching(model, clean, corrupted, metric, per="head", progress=False)
    layer = pl.activation_patching(model, clean, corrupted, metric, per="layer", progress=False)
    return model, tokens, heads, layer


def _title(fig) -> str:
    return fig.layout.title.text


def _lines_fit(title: str, width: int) -> bool:
    return all(len(line) * 8.2 <= width for line in title.split("<br>"))


def test_heatmaps_have_titles_axes_and_centred_colour_bars(results):
    _, tokens, heads, layer = results
    for res in (tokens, heads):
        fig = res.plot()
        assert "effect" in _title(fig) and _lines_fit(_title(fig), fig.layout.width)
        hm = [t for t in fig.data if t.type == "heatmap"]
        bars = [t for t in hm if t.showscale is not False]
        assert bars and bars[-1].colorbar.title.text == "effect"
        for t in hm:
            assert t.zmid == 0 and t.zmin == -t.zmax
        assert fig.layout.height >= 24 * res.shape[0] + 150 or fig.layout.height >= 300
    fig = heads.plot()
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    fig = tokens.plot()
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis2.title.text
    values = tokens.plot(of="values")  # values are not centred on 0 (sequential scale)
    assert "patched" in _title(values) and values.data[-1].colorbar.title.text == "value"
    bar = layer.plot()
    assert bar.layout.xaxis.title.text == "layer" and bar.layout.yaxis.title.text == "effect"


def test_long_titles_wrap_to_the_figure_width():
    text = "activation patching · resid_pre · denoising · " + "a long metric name " * 8
    wrapped = viz.wrap_title(text, 480)
    assert "<br>" in wrapped and _lines_fit(wrapped, 480)
    fig = viz.heatmap(torch.randn(3, 4), list("abcd"), [0, 1, 2], text, "x", "y")
    assert _lines_fit(_title(fig), fig.layout.width)
    assert fig.layout.margin.t >= 44 + 20 * (_title(fig).count("<br>"))


def test_grid_overlay_one_map_per_image_with_a_following_title(results):
    model, tokens, _, _ = results
    fig = tokens.plot(kind="grid")
    n_layers = 3
    assert len(fig.data) == 2 * n_layers  # image + map per layer panel
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0", "1", "2"]
    for i, step in enumerate(steps):
        assert f"image {i}" in step.args[1]["title.text"]
        z = step.args[0]["z"]
        # panel of layer 1 holds image i's own effects at layer 1
        want = tokens.grid(1, image=i).numpy()
        assert (abs(z[3] - want) < 1e-6).all()
        assert (z[2] == viz._image_rgb(tokens.images[i])).all()  # its own clean image
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert fig.layout.coloraxis.colorbar.title.text == "effect"
    # one colour range for all images by default, per image on request
    assert len({(s.args[1]["coloraxis.cmin"], s.args[1]["coloraxis.cmax"]) for s in steps}) == 1
    own = tokens.plot(kind="grid", per_image_scale=True).layout.sliders[0].steps
    lims = [s.args[1]["coloraxis.cmax"] for s in own]
    for i, lim in enumerate(lims):
        assert lim == pytest.approx(float(tokens.effects_per_example[i, :, 1:].abs().max()),
                                    rel=1e-5)
    assert not fig.frames  # no animation frames: nothing auto-plays when the page loads
    mean = tokens.plot(kind="grid", per_image=False)
    assert "mean over images" in _title(mean) and not mean.layout.sliders


def test_attribution_map_slider_title_follows_image_and_class(results):
    model, _, _, _ = results
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    amap = pl.caap(model, x, target=torch.tensor([1, 2, 3]), layers=(0, 2), progress=False)
    fig = amap.plot(None)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0", "1", "2"]
    assert ["class 1" in s.args[1]["title.text"] for s in steps] == [True, False, False]
    assert "image 2, class 3" in steps[2].args[1]["title.text"]
    assert fig.layout.coloraxis.colorbar.title.text == "caap"


def test_report_tables_scroll_instead_of_overflowing():
    from patchlens.report import HtmlReport

    html = HtmlReport("t").table([{"a" * 40: 1.0, "b": "x"}]).to_html()
    assert 'class="table-wrap"' in html and "overflow-x: auto" in html


def test_old_names_warn_and_still_work(tmp_path):
    """Names that collided before 0.2: the HTML `Report` (now `HtmlReport`, beside
    `DivergenceReport`) and a dataset run's `recipe_name` / `recipe_args` (now `task_name` /
    `task_args`: a `Recipe` composes interventions)."""
    import patchlens.report as report_module
    from patchlens.run import dataset, load_results

    with pytest.warns(DeprecationWarning, match="HtmlReport"):
        old = report_module.Report
    assert old is report_module.HtmlReport

    def task(model, batch):
        return {"double": batch["images"].flatten(1)[:, :2] * 2}

    x = torch.arange(24.0).reshape(3, 2, 2, 2)
    with pytest.warns(DeprecationWarning, match="task_name"):
        dataset(task, x, tmp_path / "run", recipe_name="doubling", progress=False,
                verbose=False)
    assert torch.equal(load_results(tmp_path / "run")["double"], x.flatten(1)[:, :2] * 2)
    with pytest.raises(InputError, match="unexpected keyword"):
        dataset(task, x, tmp_path / "run2", recipe_nmae="x", progress=False, verbose=False)
