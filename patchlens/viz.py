"""Plotly figures shared by results and attribution maps. Functions return a `Figure`; the
notebook shows it.

Every figure has a title that wraps to the figure's width, axis titles, a titled colour bar,
a diverging colour scale centred on 0 for signed quantities (effects, attributions) and a
height that follows the data. Maps over images draw each image's own map over that image, with
an image slider (the title follows the slider) and a shared or per-image colour scale.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import torch

DIVERGING = "RdBu"
SEQUENTIAL = "Viridis"
_RDBU = ["#67001f", "#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de",
         "#4393c3", "#2166ac", "#053061"]
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
            "#6ece58", "#b5de2b", "#fde725"]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.3f})"


def overlay_scale(diverging: bool, max_alpha: float = 0.85) -> list:
    """A colour scale for maps laid over images: transparent where the map is 0 (diverging)
    or at its minimum (sequential), opaque towards the extremes, so the image shows through
    where nothing happens."""
    colors = _RDBU if diverging else _VIRIDIS
    n = len(colors) - 1
    out = []
    for i, c in enumerate(colors):
        pos = i / n
        dist = abs(2 * pos - 1) if diverging else pos
        out.append([pos, _rgba(c, max_alpha * dist ** 0.8)])
    return out
PANEL_PX = 190  # side of one map panel over an image
MAX_PANELS_PER_ROW = 6


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _image_rgb(image) -> np.ndarray:
    img = _np(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def wrap_title(text: str, width_px: int | None, px_per_char: float = 8.2) -> str:
    """``text`` broken into lines (``<br>``) that fit ``width_px`` at the title's font size."""
    if not text or width_px is None:
        return text
    chars = max(20, int((width_px - 40) / px_per_char))
    return "<br>".join(textwrap.wrap(text, chars)) or text


def finish(fig, title: str, width: int | None, height: int, x_title: str | None = None,
           y_title: str | None = None):
    """Title (wrapped to ``width``, room made for it), axis titles and size."""
    title = wrap_title(title, width or 900)
    lines = title.count("<br>") + 1
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", xref="container", y=1, yref="container",
                   yanchor="top", pad=dict(t=12), font=dict(size=15)),
        margin=dict(t=44 + 20 * lines, l=60, r=20, b=50),
        height=height + 20 * (lines - 1), width=width,
    )
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def colorbar(title: str) -> dict:
    return dict(title=dict(text=title, side="right"), thickness=14, len=0.9)


def _limits(z: np.ndarray, diverging: bool) -> dict:
    """Colour range: symmetric about 0 for diverging scales, data range otherwise."""
    finite = z[np.isfinite(z)]
    if not finite.size:
        return dict(zmin=-1.0, zmax=1.0) if diverging else {}
    if diverging:
        lim = float(np.abs(finite).max()) or 1.0
        return dict(zmin=-lim, zmax=lim, zmid=0)
    lo, hi = float(finite.min()), float(finite.max())
    return dict(zmin=lo, zmax=hi if hi > lo else lo + 1.0)


def heatmap(values, x_labels, y_labels, title: str = "", x_title: str = "", y_title: str = "",
            diverging: bool = True, colorbar_title: str = "value"):
    """A labelled heatmap (rows top to bottom), colour bar titled ``colorbar_title``."""
    import plotly.graph_objects as go

    z = _np(values)
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(v) for v in x_labels], y=[str(v) for v in y_labels],
        colorscale=DIVERGING if diverging else SEQUENTIAL, colorbar=colorbar(colorbar_title),
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{colorbar_title} "
                      "%{z:.4f}<extra></extra>", **_limits(z, diverging),
    ))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    width = int(min(1100, max(480, 140 + 26 * len(x_labels))))
    return finish(fig, title, width, max(300, 24 * len(y_labels) + 150), x_title, y_title)


def layer_token_heatmap(values, layers, tokens, n_prefix: int, title: str = "",
                        colorbar_title: str = "value", diverging: bool = True):
    """Layer x token heatmap with prefix tokens in their own narrow panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    z = _np(values)
    if n_prefix == 0 or n_prefix == len(tokens):
        return heatmap(values, tokens, layers, title, "token", "layer", diverging,
                       colorbar_title)
    ylab = [str(v) for v in layers]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.02,
                        column_widths=[max(0.06, n_prefix / len(tokens)), 1.0],
                        subplot_titles=("prefix", "patches (row-major)"))
    scale = dict(colorscale=DIVERGING if diverging else SEQUENTIAL, **_limits(z, diverging))
    hover = f"layer %{{y}}<br>token %{{x}}<br>{colorbar_title} %{{z:.4f}}<extra></extra>"
    fig.add_trace(go.Heatmap(z=z[:, :n_prefix], x=[str(t) for t in tokens[:n_prefix]], y=ylab,
                             showscale=False, hovertemplate=hover, **scale), 1, 1)
    fig.add_trace(go.Heatmap(z=z[:, n_prefix:], x=[str(t) for t in tokens[n_prefix:]], y=ylab,
                             colorbar=colorbar(colorbar_title), hovertemplate=hover, **scale),
                  1, 2)
    fig.update_yaxes(autorange="reversed", type="category", title_text="layer", row=1, col=1)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="token", row=1, col=1)
    fig.update_xaxes(title_text="patch token (row r, column c)", row=1, col=2)
    width = int(min(1200, max(560, 160 + 16 * len(tokens))))
    return finish(fig, title, width, max(300, 24 * len(layers) + 170))


def grid_overlay(maps, images=None, frame_labels=None, title: str = "", opacity: float = 0.85,
                 diverging: bool = True, *, image_labels=None, image_titles=None,
                 colorbar_title: str = "value", per_image_scale: bool = False,
                 panel_title: str = "layer"):
    """Maps over the patch grid laid over images.

    Args:
        maps: ``[n_images, n_panels, grid_h, grid_w]`` (or ``[n_panels, gh, gw]`` /
            ``[gh, gw]`` for one image): one panel per map (e.g. per layer), one slider step
            per image.
        images: ``[n_images, C, H, W]`` (or ``[C, H, W]``) in [0, 1], each drawn under its
            own maps; None draws the maps alone.
        frame_labels: one label per panel (``"{panel_title} {label}"`` above it).
        image_labels: short slider label per image (default its index).
        image_titles: the figure title per image (follows the slider; default ``title``).
        per_image_scale: each image's maps on their own colour range (else one range for all).
        opacity: the map's opacity at the colour range's extremes; it fades to transparent
            towards 0 (`overlay_scale`) so the image shows where the map is small.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    m = _np(maps)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[None]
    n_img, n_pan, gh, gw = m.shape
    imgs = None
    if images is not None:
        imgs = _np(images)
        if imgs.ndim == 3:
            imgs = imgs[None]
        if imgs.shape[0] == 1 and n_img > 1:
            imgs = np.repeat(imgs, n_img, axis=0)
        imgs = [_image_rgb(i) for i in imgs]
        h, w = imgs[0].shape[:2]
    else:
        h, w = gh, gw
    panel_labels = [str(v) for v in (frame_labels if frame_labels is not None else
                                     range(n_pan))]
    slider_labels = [str(v) for v in (image_labels if image_labels is not None else
                                      range(n_img))]
    titles = list(image_titles) if image_titles is not None else [title] * n_img
    cols = min(n_pan, MAX_PANELS_PER_ROW)
    rows = -(-n_pan // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.02, vertical_spacing=0.08,
                        subplot_titles=[f"{panel_title} {lab}" if n_pan > 1 else ""
                                        for lab in panel_labels])
    cx, cy = (np.arange(gw) + 0.5) * w / gw, (np.arange(gh) + 0.5) * h / gh

    def scale_of(i: int) -> dict:
        z = m[i] if per_image_scale else m
        lim = _limits(z, diverging)
        return dict(cmin=lim.get("zmin"), cmax=lim.get("zmax"))

    def traces(i: int) -> list:
        out = []
        for p in range(n_pan):
            if imgs is not None:
                out.append(go.Image(z=imgs[i], hoverinfo="skip"))
            out.append(go.Heatmap(
                z=m[i, p], x=cx, y=cy, coloraxis="coloraxis",
                customdata=np.stack(np.meshgrid(np.arange(gw), np.arange(gh)), -1),
                hovertemplate=("row %{customdata[1]}, col %{customdata[0]}<br>"
                               f"{colorbar_title} %{{z:.4f}}<extra></extra>")))
        return out

    for p, tr in enumerate(_chunks(traces(0), 2 if imgs is not None else 1)):
        for t in tr:
            fig.add_trace(t, p // cols + 1, p % cols + 1)
    cscale = (overlay_scale(diverging, opacity) if imgs is not None else
              DIVERGING if diverging else SEQUENTIAL)
    fig.update_layout(coloraxis=dict(colorscale=cscale, colorbar=colorbar(colorbar_title),
                                     **scale_of(0)), plot_bgcolor="white")
    tick = max(1, gw // 8)
    fig.update_xaxes(range=[0, w], tickvals=cx[::tick], ticktext=list(range(0, gw, tick)),
                     showgrid=False, zeroline=False, tickfont=dict(size=9))
    tick = max(1, gh // 8)
    fig.update_yaxes(range=[h, 0], tickvals=cy[::tick], ticktext=list(range(0, gh, tick)),
                     showgrid=False, zeroline=False, tickfont=dict(size=9),
                     scaleanchor="x", constrain="domain")
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="patch row", row=r, col=1)
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="patch column", row=rows, col=c)
    if n_img > 1:
        # "update" steps (no animation frames: nothing auto-plays on load): each step swaps
        # the traces' data for its image's and sets the title and colour range
        steps = []
        for i, lab in enumerate(slider_labels):
            zs = [t.z for t in traces(i)]
            scale = {f"coloraxis.{k}": v for k, v in scale_of(i).items()}
            steps.append(dict(method="update", label=lab, args=[
                {"z": zs}, {"title.text": wrap_title(titles[i], _width(cols)), **scale}]))
        fig.update_layout(sliders=[dict(
            steps=steps, active=0, pad=dict(t=36, b=4), x=0.02, len=0.96,
            currentvalue=dict(prefix="image ", font=dict(size=13)),
            font=dict(size=11 if n_img <= 12 else 9))])
    extra = 80 if n_img > 1 else 0
    return finish(fig, titles[0], _width(cols), rows * (PANEL_PX + 34) + 90 + extra)


def _width(cols: int) -> int:
    return max(460, cols * PANEL_PX + 170)


def _chunks(seq: list, k: int) -> list[list]:
    return [seq[i:i + k] for i in range(0, len(seq), k)]


# ---- results ---------------------------------------------------------------------------------
SHORT = {"effects": "effect", "values": "value", "normalized_effects": "normalised effect"}


def plot_patch_result(result, kind: str | None = None, of: str = "effects", **kwargs: Any):
    """The default figure of a `PatchResult` (see `PatchResult.plot`)."""
    axes = result.axes
    what = SHORT[of]
    title = kwargs.pop("title", _title(result, result.describe(of)))
    diverging = of != "values"
    if kind is None:
        kind = "heatmap"
    if kind == "grid":
        return _grid(result, of, title, diverging, **kwargs)
    if kwargs:
        raise TypeError(f"Unexpected arguments for a {kind} plot: {sorted(kwargs)}")
    vals = result.quantity(of)
    if axes == ("layer", "token"):
        n_prefix = sum(1 for t in result.coords["token"] if t < result.layout.n_prefix)
        return layer_token_heatmap(vals, result.labels["layer"], result.labels["token"],
                                   n_prefix, title, what, diverging)
    if len(axes) == 2:
        return heatmap(vals, result.labels[axes[1]], result.labels[axes[0]], title,
                       axes[1], axes[0], diverging, what)
    if len(axes) == 1:
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=[str(v) for v in result.labels[axes[0]]], y=_np(vals),
                               marker_color="#4a6fa5"))
        fig.update_xaxes(type="category")
        n = len(result.labels[axes[0]])
        return finish(fig, title, int(min(1100, max(480, 140 + 28 * n))), 380, axes[0], what)
    if len(axes) == 3:  # e.g. layer x head x token: heatmap of the sum over the last axis
        return heatmap(vals.sum(-1), result.labels[axes[1]], result.labels[axes[0]],
                       title + f" (summed over {axes[2]})", axes[1], axes[0], diverging,
                       f"{what}, summed over {axes[2]}")
    raise ValueError(f"No default plot for axes {axes}")


def _grid(result, of: str, title: str, diverging: bool, images=None, image=None,
          per_image: bool = True, per_image_scale: bool = False, opacity: float = 0.85):
    """Per-layer maps over the images: each image's own map over its own image (slider), or
    the mean over images (``per_image=False``, or a single background ``image=``)."""
    if "token" not in result.axes or "layer" not in result.axes:
        raise ValueError("kind='grid' needs layer and token axes")
    layers = result.labels["layer"]
    coords = result.coords["layer"]
    what = SHORT[of]
    if image is not None or not per_image or result.per_example is None:
        maps = torch.stack([result.grid(layer, of=of) for layer in coords])
        bg = image if image is not None else (images[0] if images is not None else result.image)
        return grid_overlay(maps, bg, layers, f"{title} · mean over images", opacity,
                            diverging, colorbar_title=what)
    bg = images if images is not None else result.images
    n = result.per_example.shape[0]
    maps = torch.stack([torch.stack([result.grid(layer, of=of, image=i) for layer in coords])
                        for i in range(n)])
    titles = [f"{title} · image {i}" for i in range(n)]
    return grid_overlay(maps, bg, layers, title, opacity, diverging, image_titles=titles,
                        colorbar_title=what, per_image_scale=per_image_scale)


def _title(result, what: str) -> str:
    m = result.meta
    bits = [m.get("recipe", "patching"), m.get("site", ""), m.get("direction", ""),
            f"→ {m['receivers']}" if m.get("receivers") else "", what]
    return " · ".join(str(b) for b in bits if b)



# ---- circuits ------------------------------------------------------------------------------------
_INPUT_DASH = {"q": "dot", "k": "dash", "v": "solid", "mlp": "solid", "out": "solid"}


def _node_positions(graph) -> dict[str, tuple[float, float]]:
    """(x, y) of every node: the embedding at x = -1, layer l's heads at x = l (y = head), its
    MLP at x = l + 0.5, the output at x = n_layers; token parts spread around their node."""
    h = graph.n_heads
    mid = (h - 1) / 2
    pos: dict[str, tuple[float, float]] = {}
    by_base: dict[str, list] = {}
    for nd in graph.nodes:
        by_base.setdefault(nd.base, []).append(nd)
    for base, nds in by_base.items():
        nd = nds[0]
        if nd.kind == "embed":
            x, y = -1.0, mid
        elif nd.kind == "head":
            x, y = float(nd.layer), float(nd.head)
        elif nd.kind == "mlp":
            x, y = nd.layer + 0.5, mid
        else:
            x, y = float(graph.n_layers), mid
        pos[base] = (x, y)
        if len(nds) > 1:  # token parts: a short vertical fan around the node
            span = max(h - 1, 1) if nd.kind == "embed" else 0.6
            for i, part in enumerate(nds):
                pos[part.name] = (x - (0.15 if nd.kind != "embed" else 0.0),
                                  y - span / 2 + span * i / (len(nds) - 1))
    return pos


def circuit_figure(graph, edges, values=None, title: str = "", height: int | None = None):
    """The edges ``edges`` (indices) of ``graph`` drawn between their nodes: nodes laid out by
    layer (x) and head (y; MLPs between layers), edge width by ``|value|``, colour by sign (red
    positive, blue negative), line style by the receiver's input (q dotted, k dashed, v / MLP /
    output solid); hover shows each edge and node."""
    import plotly.graph_objects as go

    ids = [int(i) for i in (edges.tolist() if isinstance(edges, torch.Tensor) else edges)]
    vals = None if values is None else _np(values)
    pos = _node_positions(graph)
    lim = max((abs(float(vals[i])) for i in ids), default=0.0) if vals is not None else 0.0
    fig = go.Figure()
    mid_x, mid_y, mid_text = [], [], []
    used: dict[str, int] = {}
    for i in ids:
        e = graph.edges[i]
        s, r = graph.nodes[e.sender], graph.receivers[e.receiver]
        (x0, y0), (x1, y1) = pos[s.name], pos[r.node]
        v = float(vals[i]) if vals is not None else None
        width = 1.0 if not lim or v is None else 0.8 + 7.2 * abs(v) / lim
        colour = "#888888" if v is None else ("#d62728" if v >= 0 else "#1f77b4")
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip",
                                 line=dict(width=width, color=colour, dash=_INPUT_DASH[r.input]),
                                 opacity=0.75, showlegend=False))
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_text.append(f"{e.name}<br>input {r.input}" + ("" if v is None else f"<br>score {v:+.4g}"))
        used[s.name] = used.get(s.name, 0) + 1
        used[r.node] = used.get(r.node, 0) + 1
    fig.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", text=mid_text,
                             hovertemplate="%{text}<extra></extra>",
                             marker=dict(size=6, color="rgba(0,0,0,0.05)"), showlegend=False))
    names = list(pos)
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text",
        text=[n if used.get(n) else "" for n in names], textposition="top center",
        textfont=dict(size=9), customdata=[used.get(n, 0) for n in names],
        hovertemplate="%{text}<br>%{customdata} drawn edges<extra></extra>",
        marker=dict(size=[11 if used.get(n) else 5 for n in names],
                    color=["#333333" if used.get(n) else "#cccccc" for n in names]),
        showlegend=False))
    n = graph.n_layers
    fig.update_xaxes(tickvals=[-1] + list(range(n)) + [n],
                     ticktext=["embed"] + [f"L{l}" for l in range(n)] + [graph.output.name],
                     zeroline=False, showgrid=False)
    fig.update_yaxes(tickvals=list(range(graph.n_heads)),
                     ticktext=[f"h{j}" for j in range(graph.n_heads)], autorange="reversed",
                     zeroline=False, showgrid=False)
    fig.update_layout(title=title, height=height or max(360, 60 * graph.n_heads + 160),
                      plot_bgcolor="white",
                      annotations=[dict(text="q dotted · k dashed · v, MLP, output solid · red "
                                    "+ / blue −", xref="paper", yref="paper", x=0, y=-0.12,
                                    showarrow=False, font=dict(size=10))])
    return fig


def token_parts_figure(graph, values, node: str = "embed", image=None, how: str = "abs",
                       title: str = "", **kwargs: Any):
    """The token parts of a split node over the image grid: each part's value is the sum of
    ``|value|`` (``how="abs"``) or of the values (``how="sum"``) of its outgoing edges."""
    from patchlens.errors import InputError

    parts = [i for i, nd in enumerate(graph.nodes) if nd.base == node and nd.part is not None]
    if not parts:
        raise InputError(f"{node!r} is not split by tokens in this graph; build it with "
                         f"Graph.from_model(model, tokens={{...}}, split=[{node!r}]).")
    if how not in ("abs", "sum"):
        raise InputError(f"how must be 'abs' or 'sum', got {how!r}.")
    vals = torch.as_tensor(values).detach().double().cpu()
    per_part = {i: 0.0 for i in parts}
    for k, e in enumerate(graph.edges):
        if e.sender in per_part:
            per_part[e.sender] += float(vals[k].abs() if how == "abs" else vals[k])
    lay = graph.layout
    grid = torch.full((lay.n_patches,), float("nan"), dtype=torch.float64)
    prefix = []
    masks = graph.masks
    for i, v in per_part.items():
        for t in torch.nonzero(masks[i]).flatten().tolist():
            if t >= lay.n_prefix:
                grid[t - lay.n_prefix] = v
            else:
                prefix.append(f"{lay.label(t)} {v:.3g}")
    name = title or f"{node}: {'|score|' if how == 'abs' else 'score'} summed over each token part"
    if prefix:
        name += f" (prefix: {', '.join(prefix[:4])})"
    return grid_overlay(grid.reshape(lay.grid), image, title=name, diverging=how == "sum",
                        **kwargs)


def faithfulness_figure(curve, title: str = "", log_x: bool = True):
    """Faithfulness against the share of edges kept, one line per method, the random baseline
    dashed; the legend gives each curve's area."""
    import plotly.graph_objects as go

    fig = go.Figure()
    x = [100 * f for f in curve.fractions]
    for name, v in curve.values.items():
        fig.add_trace(go.Scatter(x=x, y=_np(v), mode="lines+markers",
                                 name=f"{name} (area {curve.area[name]:.3f})",
                                 customdata=curve.ks,
                                 hovertemplate="%{customdata} edges (%{x:.2f}%)<br>"
                                               "faithfulness %{y:.3f}<extra></extra>"))
    if curve.random is not None:
        fig.add_trace(go.Scatter(x=x, y=_np(curve.random), mode="lines",
                                 name=f"random (area {curve.area['random']:.3f})",
                                 line=dict(dash="dash", color="#999999")))
    fig.update_layout(title=title or f"faithfulness · {curve.ablation} ablation",
                      xaxis_title="edges kept (% of the graph)", yaxis_title="faithfulness",
                      height=380)
    if log_x:
        fig.update_xaxes(type="log")
    return fig
