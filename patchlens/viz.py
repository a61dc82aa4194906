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
