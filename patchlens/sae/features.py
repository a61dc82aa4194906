"""Looking at SAE features: a table of all of them, and a view of one (top-activating images
with the patches where it fires, its activation histogram, its logit effect).

The logit effect in the view is exact: the feature is zero-ablated (at every token) by the
patching engine on its top images with the SAE spliced with its error term, so the difference
``logits - logits(ablated)`` is what the feature contributes through the rest of the network.
The table's per-class effects are the first-order version of the same (gradient x activation,
one backward pass per class; `feature_attribution`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.engine import Variant, capture, run_variants
from patchlens.patching.interventions import Zero
from patchlens.patching.sites import Site
from patchlens.sae.attribution import feature_attribution
from patchlens.sae.sae import d_sae_of
from patchlens.sae.splicing import spliced

MAX_CLASSES = 16  # classes whose effects the table reports (the most predicted ones beyond)


def feature_activations(model, images: Tensor, *, sae: Any = None, hook: str | None = None,
                        batch_size: int | None = 64) -> Tensor:
    """SAE feature activations on ``images``: ``[B, tokens, d_sae]`` (``[B, d_sae]`` at a hook
    without a token axis), read at the spliced SAE's ``hook_sae_acts_post``."""
    model.check_images(images)
    with spliced(model, sae, hook) as names:
        return capture(model, images, [names.acts_post], return_type=None,
                       batch_size=batch_size).acts[names.acts_post]


def features(model, images: Tensor, *, sae: Any = None, hook: str | None = None,
             classes: Any = None, effects: bool = True, batch_size: int | None = 64):
    """One row per feature: how often and how strongly it fires on ``images``, where, and which
    class logit it pushes.

    Columns: ``feature``, ``frequency`` (share of token vectors where it is active), ``mean_act``
    (mean activation where active), ``max_act``, ``top_image`` / ``top_token`` (where the
    maximum is), ``prefix_share`` (share of its activation mass on prefix tokens such as
    ``cls``), and with ``effects`` ``top_class`` / ``top_effect``: the class whose logit it
    raises most (gradient x activation, mean over the images) and by how much. ``classes``:
    the classes considered (default: all up to 16, else the 16 most predicted).
    """
    import pandas as pd

    acts = feature_activations(model, images, sae=sae, hook=hook, batch_size=batch_size)
    acts = acts.float().cpu()
    if acts.ndim == 2:
        acts = acts[:, None]
    b, t, d = acts.shape
    active = acts != 0
    n_prefix = model.layout.n_prefix if t == model.layout_for(tuple(images.shape[-2:])).n_tokens \
        else 0
    freq = active.float().mean((0, 1))
    mass = acts.clamp_min(0).sum((0, 1))
    mean_act = torch.where(active.any(0).any(0), acts.sum((0, 1)) / active.sum((0, 1)).clamp_min(1),
                           torch.zeros(d))
    flat = acts.permute(2, 0, 1).reshape(d, -1)
    mx, where = flat.max(-1)
    prefix = acts[:, :n_prefix].clamp_min(0).sum((0, 1)) / mass.clamp_min(1e-12)
    layout = model.layout_for(tuple(images.shape[-2:]))
    rows = []
    for f in range(d):
        img, tok = divmod(int(where[f]), t)
        rows.append({"feature": f, "frequency": float(freq[f]), "mean_act": float(mean_act[f]),
                     "max_act": float(mx[f]), "top_image": img,
                     "top_token": layout.label(tok) if t == layout.n_tokens else tok,
                     "prefix_share": float(prefix[f]) if n_prefix else float("nan")})
    df = pd.DataFrame(rows)
    if effects:
        eff = class_effects(model, images, sae=sae, hook=hook, classes=classes,
                            batch_size=batch_size)
        best = eff["effects"].argmax(0)
        df["top_class"] = [int(eff["classes"][int(i)]) for i in best]
        df["top_effect"] = eff["effects"].max(0).values.tolist()
    return df


def class_effects(model, images: Tensor, *, sae: Any = None, hook: str | None = None,
                  classes: Any = None, batch_size: int | None = 64) -> dict[str, Tensor]:
    """``{"classes": [C], "effects": [C, d_sae]}``: the mean over ``images`` of each feature's
    gradient x activation for each class's logit (one backward pass per class)."""
    n_classes = model.cfg.n_classes
    if not n_classes:
        raise InputError("Class effects need a classifier head; this model is headless.")
    if classes is None:
        if n_classes <= MAX_CLASSES:
            classes = list(range(n_classes))
        else:
            pred = capture(model, images, [], batch_size=batch_size).output.argmax(-1).cpu()
            classes = torch.bincount(pred, minlength=n_classes).topk(MAX_CLASSES).indices.tolist()
    classes = [int(c) for c in classes]
    eff = torch.stack([feature_attribution(model, images, c, sae=sae, hook=hook,
                                           batch_size=batch_size).float().mean(0).cpu()
                       for c in classes])
    return {"classes": torch.tensor(classes), "effects": eff}


@dataclass
class FeatureView:
    """One feature on a set of images (`feature_view`).

    Attributes:
        feature: the feature index; hook: the SAE's hook.
        top: indices of the top-activating images (by the feature's maximum over tokens).
        images: ``[n, C, H, W]`` those images in [0, 1].
        maps: ``[n, grid_h, grid_w]`` the feature's activation on each patch of them.
        prefix: ``[n, n_prefix]`` its activation on the prefix tokens (cls, registers).
        values: every nonzero activation over all images and tokens (for the histogram).
        frequency: share of token vectors where it is active.
        logit_effect: ``[n_classes]`` mean over the top images (where it fires) of
            ``logits - logits(feature zero-ablated)``: what it adds to each logit.
    """

    feature: int
    hook: str
    top: Tensor
    images: Tensor
    maps: Tensor
    prefix: Tensor
    values: Tensor
    frequency: float
    logit_effect: Tensor | None
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        eff = ""
        if self.logit_effect is not None and self.logit_effect.numel():
            c = int(self.logit_effect.argmax())
            eff = f", raises class {c} by {float(self.logit_effect[c]):.3f}"
        return (f"FeatureView(feature {self.feature} at {self.hook}: active on "
                f"{100 * self.frequency:.2f}% of tokens, max {float(self.values.max()) if self.values.numel() else 0:.3f}"
                f"{eff})")

    def plot(self, opacity: float = 0.6):
        """Plotly figure: the top images with the feature's activation over their patches, the
        activation histogram and the logit effect per class."""
        return plot_feature(self, opacity=opacity)


def feature_view(model, images: Tensor, feature: int, *, sae: Any = None,
                 hook: str | None = None, n_top: int = 6, effect: bool = True,
                 batch_size: int | None = 64) -> FeatureView:
    """Where feature ``feature`` fires on ``images`` (normalised ``[B, C, H, W]``), and what it
    does to the logits (see `FeatureView`)."""
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
        raise InputError(f"feature must be a non-negative int, got {feature!r}.")
    if isinstance(n_top, bool) or not isinstance(n_top, int) or n_top < 1:
        raise InputError(f"n_top must be a positive int, got {n_top!r}.")
    with spliced(model, sae, hook) as names:
        d = d_sae_of(model.acts_to_saes[names.hook])
        if feature >= d:
            raise InputError(f"feature {feature} is out of range: the SAE has {d} features.")
        acts = capture(model, images, [names.acts_post], return_type=None,
                       batch_size=batch_size).acts[names.acts_post]
        a = acts[..., feature].float().cpu()
        if a.ndim == 1:
            a = a[:, None]
        strength = a.amax(1)
        n = min(n_top, images.shape[0])
        top = torch.argsort(strength, descending=True)[:n]
        layout = model.layout_for(tuple(images.shape[-2:]))
        has_grid = a.shape[1] == layout.n_tokens
        maps = (a[top, layout.n_prefix :].reshape(n, *layout.grid) if has_grid
                else torch.zeros(n, 0, 0))
        prefix = a[top, : layout.n_prefix] if has_grid else a[top]
        logit_effect = None
        fires = top[strength[top] > 0]
        if effect and model.cfg.n_classes and fires.numel():
            x = images[fires]
            v = [Variant([(Site(names.acts_post, features=[feature]), Zero())], "ablated")]
            ablated = run_variants(model, x, v, batch_size=batch_size, progress=False).outputs[0]
            plain = capture(model, x, [], batch_size=batch_size).output
            logit_effect = (plain - ablated).float().mean(0).cpu()
    values = a[a != 0]
    return FeatureView(feature, names.hook, top, model.to_image(images[top]).cpu(), maps,
                       prefix, values, float((a != 0).float().mean()), logit_effect,
                       meta={"strength": strength[top]})


def plot_feature(view: FeatureView, opacity: float = 0.6):
    """The figure of `FeatureView.plot`."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(view.top)
    cols = max(n, 2)
    specs = [[{}] * cols, [{"colspan": cols // 2}] + [None] * (cols // 2 - 1)
             + [{"colspan": cols - cols // 2}] + [None] * (cols - cols // 2 - 1)]
    titles = [f"image {int(i)} (max {float(s):.2f})" for i, s in zip(view.top, view.meta["strength"])]
    titles += [""] * (cols - n) + ["activation histogram (nonzero)", "logit effect (ablation)"]
    fig = make_subplots(rows=2, cols=cols, specs=specs, subplot_titles=titles,
                        row_heights=[0.55, 0.45], vertical_spacing=0.12)
    vmax = float(view.maps.max()) if view.maps.numel() and float(view.maps.max()) > 0 else 1.0
    for j in range(n):
        img = view.images[j].permute(1, 2, 0).clamp(0, 1).numpy()
        h, w = img.shape[:2]
        fig.add_trace(go.Image(z=(img * 255).astype(np.uint8), hoverinfo="skip"), 1, j + 1)
        if view.maps.numel():
            m = view.maps[j].numpy()
            gh, gw = m.shape
            fig.add_trace(go.Heatmap(
                z=np.where(m > 0, m, np.nan), x0=w / gw / 2 - 0.5, dx=w / gw, y0=h / gh / 2 - 0.5,
                dy=h / gh, zmin=0, zmax=vmax, colorscale="Inferno", opacity=opacity,
                showscale=j == n - 1, hovertemplate="activation %{z:.3f}<extra></extra>"), 1, j + 1)
        fig.update_xaxes(visible=False, row=1, col=j + 1)
        fig.update_yaxes(visible=False, autorange="reversed", row=1, col=j + 1)
    vals = view.values.numpy()
    fig.add_trace(go.Histogram(x=vals, nbinsx=40, marker_color="#444"), 2, 1)
    fig.update_yaxes(type="log", row=2, col=1)
    if view.logit_effect is not None:
        eff = view.logit_effect.numpy()
        fig.add_trace(go.Bar(x=[str(c) for c in range(len(eff))], y=eff,
                             marker_color=np.where(eff >= 0, "#b2182b", "#2166ac")),
                      2, cols // 2 + 1)
    fig.update_layout(title=f"feature {view.feature} at {view.hook}: active on "
                            f"{100 * view.frequency:.2f}% of tokens",
                      height=560, showlegend=False)
    return fig


__all__ = ["features", "feature_activations", "class_effects", "feature_view", "FeatureView",
           "plot_feature"]
