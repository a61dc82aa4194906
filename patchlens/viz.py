"""Plotly figures shared by results and attribution maps. Functions return a `Figure`; the
notebook shows it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _image_rgb(image) -> np.ndarray:
    img = _np(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def heatmap(values, x_labels, y_labels, title: str = "", x_title: str = "", y_title: str = "",
            diverging: bool = True):
    import plotly.graph_objects as go

    z = _np(values)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(v) for v in x_labels], y=[str(v) for v in y_labels],
        colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
        zmin=-lim if diverging else None, zmax=lim if diverging else None,
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>value %{{z:.4f}}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title,
                      yaxis_autorange="reversed", height=max(300, 22 * len(y_labels) + 120))
    return fig


def layer_token_heatmap(values, layers, tokens, n_prefix: int, title: str = ""):
    """Layer x token heatmap with prefix tokens in their own narrow panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    z = _np(values)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    ylab = [str(v) for v in layers]
    if n_prefix == 0 or n_prefix == len(tokens):
        return heatmap(values, tokens, layers, title, "token", "layer")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.02,
                        column_widths=[max(0.06, n_prefix / len(tokens)), 1.0],
                        subplot_titles=("prefix", "patches"))
    common = dict(colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim)
    fig.add_trace(go.Heatmap(z=z[:, :n_prefix], x=[str(t) for t in tokens[:n_prefix]], y=ylab,
                             showscale=False, **common), 1, 1)
    fig.add_trace(go.Heatmap(z=z[:, n_prefix:], x=[str(t) for t in tokens[n_prefix:]], y=ylab,
                             **common), 1, 2)
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_layout(title=title, height=max(300, 22 * len(layers) + 120))
    return fig


def grid_overlay(maps, image=None, frame_labels=None, title: str = "", opacity: float = 0.55,
                 diverging: bool = True):
    """Maps ``[n, grid_h, grid_w]`` over an image, one frame per map with a slider."""
    import plotly.graph_objects as go

    maps = _np(maps)
    if maps.ndim == 2:
        maps = maps[None]
    n, gh, gw = maps.shape
    lim = float(np.nanmax(np.abs(maps))) if np.isfinite(maps).any() else 1.0
    labels = [str(v) for v in (frame_labels if frame_labels is not None else range(n))]
    if image is not None:
        rgb = _image_rgb(image)
        h, w = rgb.shape[:2]
    else:
        h, w = gh, gw
    dx, dy = w / gw, h / gh
    x = (np.arange(gw) + 0.5) * dx
    y = (np.arange(gh) + 0.5) * dy

    def trace(m):
        return go.Heatmap(z=m, x=x, y=y, opacity=opacity if image is not None else 1.0,
                          colorscale="RdBu" if diverging else "Viridis",
                          zmid=0 if diverging else None, zmin=-lim if diverging else 0, zmax=lim,
                          hovertemplate="row %{y}<br>col %{x}<br>%{z:.4f}<extra></extra>")

    data = []
    if image is not None:
        data.append(go.Image(z=rgb))
    data.append(trace(maps[0]))
    fig = go.Figure(data=data)
    if n > 1:
        fig.frames = [go.Frame(data=([go.Image(z=rgb)] if image is not None else []) + [trace(m)],
                               name=lab) for m, lab in zip(maps, labels)]
        steps = [dict(method="animate", label=lab,
                      args=[[lab], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                 for lab in labels]
        fig.update_layout(sliders=[dict(steps=steps, currentvalue=dict(prefix="layer "))])
    fig.update_xaxes(showticklabels=False, range=[0, w])
    fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(title=title, height=420, width=460)
    return fig


def plot_patch_result(result, kind: str | None = None, **kwargs: Any):
    axes = result.axes
    title = kwargs.pop("title", _title(result))
    if kind is None:
        kind = "heatmap"
    if kind == "grid":
        if "token" not in axes or "layer" not in axes:
            raise ValueError("kind='grid' needs layer and token axes")
        layers = result.labels["layer"]
        maps = torch.stack([result.grid(layer) for layer in result.coords["layer"]])
        return grid_overlay(maps, kwargs.pop("image", result.image), layers, title, **kwargs)
    if axes == ("layer", "token"):
        n_prefix = sum(1 for t in result.coords["token"] if t < result.layout.n_prefix)
        return layer_token_heatmap(result.values, result.labels["layer"], result.labels["token"],
                                   n_prefix, title)
    if len(axes) == 2:
        return heatmap(result.values, result.labels[axes[1]], result.labels[axes[0]], title,
                       axes[1], axes[0])
    if len(axes) == 1:
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=[str(v) for v in result.labels[axes[0]]], y=_np(result.values)))
        fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title="effect")
        return fig
    if len(axes) == 3:  # e.g. layer x head x token: heatmap of the sum over the last axis
        return heatmap(result.values.sum(-1), result.labels[axes[1]], result.labels[axes[0]],
                       title + f" (summed over {axes[2]})", axes[1], axes[0])
    raise ValueError(f"No default plot for axes {axes}")


def _title(result) -> str:
    m = result.meta
    bits = [m.get("recipe", "patching"), m.get("site", ""), m.get("direction", ""),
            str(m.get("metric", ""))]
    return " · ".join(b for b in bits if b)


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
