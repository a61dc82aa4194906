"""`DivergenceReport`: how far each patched run's representations are from the natural ones.

`diagnose` re-runs the variants through the patching engine, capturing the patched activations at
their sites and the MLP neurons downstream (reduced to per-variant maxima on the fly, so memory
stays bounded), and compares them with a fitted `Reference`. Verdicts follow Grant, Han,
Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, ICLR 2026):

- ``natural``: the patched vectors look like natural ones and no downstream neuron leaves its
  natural range;
- ``divergent-harmless``: the patched vectors are off the natural distribution (most lie beyond
  the natural 99th percentile of the per-vector measures, or the Sinkhorn ratio is large), but
  no downstream neuron is driven beyond anything natural inputs do;
- ``divergent-pernicious``: some downstream MLP neuron exceeds its natural maximum (a dormant
  pathway turned on: the paper's pernicious signature), so the measured effect may come from a
  mechanism the model never uses naturally.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.diagnostics.measures import MEASURES, MIN_OT, few_threads, ot_divergence
from patchlens.diagnostics.reference import Reference, vectors
from patchlens.errors import InputError

#: Verdict thresholds (see docs/divergence.md for how they were chosen).
THRESHOLDS: dict[str, float] = {
    # a patched vector is an outlier if its mahalanobis, knn or local_pca score is beyond
    # this percentile of held-out natural vectors (natural rate: 1-3 %)
    "outlier_pct": 99.0,
    # a site is divergent if more than this fraction of its patched vectors are outliers
    "outlier_rate": 0.5,
    # ... or if the Sinkhorn distance is this many times the natural-vs-natural baseline
    "ot_ratio": 1.5,
    # a neuron is dormant-activated above max + margin * (max - median) of its natural values
    # (and above the unpatched target at the same position); see docs/divergence.md
    "dormant_margin": 1.0,
}
VERDICTS = ("natural", "divergent-harmless", "divergent-pernicious")


def first_downstream_mlp(model, spec) -> int:
    """First layer whose ``mlp.hook_post`` an intervention at hook ``spec`` can change (the
    hook schema's forward order)."""
    n_layers = model.cfg.n_layers
    if spec.stage != "block":
        return 0 if spec.stage == "embed" else n_layers
    post = model.hook_specs.get(f"blocks.{spec.layer}.mlp.hook_post")
    return spec.layer + 1 if post is None or spec.order >= post.order else spec.layer


@dataclass
class DivergenceReport:
    """Divergence of every (variant, site) of a sweep from the natural distribution.

    Attributes:
        rows: one dict per (variant, site): measures, verdict (see `to_pandas`).
        ot: one dict per (site, token class): Sinkhorn distance of all patched vectors there,
            the natural-vs-natural baseline and their ratio.
        dormant: per variant, the neurons beyond their natural range
            (layer, neuron, value, natural max, token class), largest excess first.
        thresholds: the thresholds used for the verdicts.
        shape, axes, labels: the sweep's layout (for plots), if known.
    """

    rows: list[dict]
    ot: list[dict]
    dormant: list[list[dict]]
    thresholds: dict[str, float]
    shape: tuple[int, ...] | None = None
    axes: tuple[str, ...] | None = None
    labels: dict[str, list] | None = None
    effects: Tensor | None = None
    meta: dict = field(default_factory=dict)

    # ---- per variant -------------------------------------------------------------------------
    def variant_verdicts(self) -> list[str]:
        """Worst verdict over each variant's sites."""
        worst: dict[int, int] = defaultdict(int)
        for r in self.rows:
            worst[r["variant"]] = max(worst[r["variant"]], VERDICTS.index(r["verdict"]))
        return [VERDICTS[worst[i]] for i in range(len(self.dormant))]

    def variant_values(self, key: str) -> Tensor:
        """``[V]`` a row measure per variant (max over its sites), reshaped to the sweep."""
        vals = torch.full((len(self.dormant),), float("nan"))
        for r in self.rows:
            v = r[key]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                cur = vals[r["variant"]]
                vals[r["variant"]] = v if torch.isnan(cur) else max(float(cur), float(v))
        return vals.reshape(self.shape) if self.shape else vals

    def pernicious_share(self) -> float:
        """Share of the summed |effect| that comes from pernicious variants (NaN: no effects)."""
        if self.effects is None:
            return float("nan")
        eff = self.effects.abs().flatten().float()
        total = float(eff.sum())
        if total == 0:
            return 0.0
        mask = torch.tensor([v == "divergent-pernicious" for v in self.variant_verdicts()])
        return float(eff[mask].sum()) / total

    # ---- views -------------------------------------------------------------------------------
    def to_pandas(self):
        """One row per (variant, site): ``label, hook, class, n, <measure>_pct, norm_ratio,
        outlier_rate, ot_ratio, null_fraction, n_dormant, effect, verdict``."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items()} for r in self.rows])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(VERDICTS, 0)
        for v in self.variant_verdicts():
            out[v] += 1
        return out

    def summary(self) -> str:
        """One line: verdict counts, the largest Sinkhorn ratio and the pernicious share."""
        c = self.counts()
        parts = [f"{len(self.dormant)} variants: {c['natural']} natural, "
                 f"{c['divergent-harmless']} divergent-harmless, "
                 f"{c['divergent-pernicious']} divergent-pernicious"]
        share = self.pernicious_share()
        if not math.isnan(share):
            parts.append(f"{100 * share:.0f}% of |effect| from pernicious variants")
        ratios = [o["ratio"] for o in self.ot if not math.isnan(o["ratio"])]
        if ratios:
            parts.append(f"Sinkhorn/baseline up to {max(ratios):.2f}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        t = self.thresholds
        return (f"DivergenceReport({self.summary()})\n  thresholds: outlier beyond the natural "
                f"{t['outlier_pct']:g}th percentile; divergent if outlier rate > "
                f"{t['outlier_rate']:g} or Sinkhorn ratio > {t['ot_ratio']:g}; pernicious if a "
                f"downstream neuron exceeds its natural max by > {t['dormant_margin']:g} x "
                "(max - median)")

    def plot(self, measure: str = "outlier_rate"):
        """Plotly figure: the effect, ``measure`` and the dormant-neuron count side by side
        (per layer x token for a layer x token sweep; per variant otherwise)."""
        import numpy as np
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        panels = [("effect", self.effects), (measure, self.variant_values(measure)),
                  ("dormant neurons", self.variant_values("n_dormant"))]
        fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels],
                            horizontal_spacing=0.06)
        two_d = self.shape is not None and len(self.shape) == 2 and self.axes is not None
        for i, (name, vals) in enumerate(panels, start=1):
            if vals is None:
                continue
            z = vals.detach().float().cpu().numpy()
            if two_d:
                y = [str(v) for v in self.labels[self.axes[0]]]
                x = [str(v) for v in self.labels[self.axes[1]]]
                kw = dict(colorscale="RdBu", zmid=0) if name == "effect" else dict(
                    colorscale="Reds", zmin=0)
                fig.add_trace(go.Heatmap(z=z.reshape(self.shape), x=x, y=y, showscale=False, **kw),
                              1, i)
                fig.update_yaxes(autorange="reversed", row=1, col=i)
            else:
                labels = [str(r) for r in self.meta.get("labels", range(z.size))]
                fig.add_trace(go.Bar(x=labels, y=np.ravel(z), name=name), 1, i)
        fig.update_layout(title=f"Divergence: {self.summary()}", height=360, showlegend=False)
        return fig


# ---- building the report --------------------------------------------------------------------
def diagnose_sweep(model, target: Tensor, variants: Sequence, reference: Reference, result,
                   collector: _Collector | None = None):
    """The hook `activation_patching(..., diagnose=reference)` calls: the report with the
    sweep's effects and layout taken from ``result`` (a `PatchResult`). With ``collector``
    (a `sweep_collector` whose observers ran inside the sweep's own engine run) nothing is
    re-run; without it the variants are run again by `diagnose`."""
    effects = result.values if result is not None else None
    if collector is not None:
        rep = collector.report(effects=effects)
    else:
        rep = diagnose(model, target, variants, reference, effects=effects)
    if result is not None:
        rep.shape, rep.axes, rep.labels = tuple(result.values.shape), result.axes, result.labels
    _warn(rep)
    return rep


def sweep_collector(model, target: Tensor, variants: Sequence, reference: Reference,
                    **kwargs) -> _Collector:
    """A collector for ``variants`` on ``target``: pass ``collector.observers`` to
    `run_variants(..., observers=...)`, then call ``collector.report(effects)``."""
    return _Collector(model, target, variants, reference, **kwargs)


def _warn(rep: DivergenceReport) -> None:
    share = rep.pernicious_share()
    if not math.isnan(share) and share > 0.5:
        warnings.warn(f"{100 * share:.0f}% of the patching effect comes from divergent-pernicious "
                      "variants (downstream neurons beyond their natural range); see "
                      "result.divergence.", stacklevel=3)


MAX_JACOBIAN_OUTPUTS = 16  # logits kept in the behavioural Jacobian (the largest on the target)


def _jacobian_outputs(model, target: Tensor) -> Tensor:
    """The outputs the behavioural Jacobian differentiates: every logit when there are at most
    `MAX_JACOBIAN_OUTPUTS`, else the largest ones on the target (mean over images)."""
    head = getattr(model, "head", None)
    n_out = head.out_features if head is not None else None
    if n_out is not None and n_out <= MAX_JACOBIAN_OUTPUTS:
        return torch.arange(n_out)
    with torch.inference_mode():
        logits = model(target)
    n_out = logits.shape[-1]
    return (torch.arange(n_out) if n_out <= MAX_JACOBIAN_OUTPUTS else
            logits.float().mean(0).topk(MAX_JACOBIAN_OUTPUTS).indices.cpu())


class _Collector:
    """Reduces a sweep's patched activations to per-variant statistics while the engine runs.

    Setup (once): one forward and one backward pass of the unpatched target, repeated once per
    output row, give the natural vectors at every site hook, the Jacobian of the logits (at most
    `MAX_JACOBIAN_OUTPUTS`, the largest on the target) w.r.t. every site hook at once, and the
    target's own MLP activations. During the run, the observers keep each variant's patched
    vectors (at most ``max_vectors`` per variant and site, a fixed uniform subsample), its
    null-space fraction and the downstream neurons beyond their natural range.
    """

    def __init__(self, model, target: Tensor, variants: Sequence, reference: Reference, *,
                 behaviour: bool = True, ot: bool | str = "site", ot_samples: int = 256,
                 max_vectors: int = 256, thresholds: dict[str, float] | None = None,
                 sae: Any = None):
        from patchlens.diagnostics.sae import SAEColumns
        from patchlens.patching.engine import capture, start_layer

        self.th = {**THRESHOLDS, **(thresholds or {})}
        reference.check_model(model)
        model.check_images(target)
        if len(variants) == 0:
            raise InputError("No variants to diagnose.")
        if ot not in (False, "site", "variant", True):
            raise InputError(f"ot must be False, 'site' or 'variant'; got {ot!r}.")
        self.model, self.ref, self.variants = model, reference, variants
        self.behaviour, self.ot = behaviour, ("site" if ot is True else ot)
        self.ot_samples, self.max_vectors = ot_samples, max_vectors
        self.b = b = target.shape[0]
        n_layers = model.cfg.n_layers
        grid = (target.shape[-2] // model.cfg.patch_size[0],
                target.shape[-1] // model.cfg.patch_size[1])
        self.n_prefix = model.layout_for(tuple(target.shape[-2:])).n_prefix
        self.resolved = [[rs for site, _ in v.pairs for rs in site.resolve(model, grid)]
                         for v in variants]
        hooks = sorted({rs.hook for rss in self.resolved for rs in rss})
        for h in hooks:
            reference.check_hook(h)
            if model.hook_spec(h).has_key_axis:
                vectors(torch.zeros(1, 1, 1), model.hook_spec(h))  # raises the explanation
        self.hooks = hooks
        self.sae_columns = SAEColumns(sae) if sae is not None else None
        if self.sae_columns is not None:
            self.sae_columns.check(hooks)
        self.down = [min((first_downstream_mlp(model, rs.spec) for rs in rss),
                         default=n_layers) for rss in self.resolved]
        self.starts = [min((start_layer(model, rs.spec) for rs in rss), default=n_layers)
                       for rss in self.resolved]
        self.mlp_layers = [l for l in range(n_layers) if l in reference.neurons
                           and f"blocks.{l}.mlp.hook_post" in model.hook_dict]
        by_hook: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for vi, rss in enumerate(self.resolved):
            for si, rs in enumerate(rss):
                by_hook[rs.hook].append((vi, si))
        self.by_hook = by_hook

        # ---- one forward + backward on the unpatched target ---------------------------------
        mlp_names = [f"blocks.{l}.mlp.hook_post" for l in self.mlp_layers]
        self.specs = {h: model.hook_spec(h) for h in hooks}
        # model-sized forward and backward passes: torch's whole thread pool
        if behaviour:
            cls = _jacobian_outputs(model, target)
            k = len(cls)
            rows = cls.to(target.device).repeat_interleave(b)
            run = capture(model, target.detach().repeat(k, 1, 1, 1), hooks + mlp_names,
                          lambda out: out.gather(1, rows[:, None].to(out.device))[:, 0],
                          grads=hooks)
            # J[h]: [B, C, T, D]
            self.jac = {}
            for h in hooks:
                g = vectors(run.grads[h], self.specs[h]).float().cpu()
                self.jac[h] = g.reshape(k, b, -1, g.shape[-1]).transpose(0, 1)
        else:
            run = capture(model, target, hooks + mlp_names, return_type=None)
            self.jac = {}
        acts = run.acts
        self.natural = {h: vectors(acts[h][:b], self.specs[h]).float().cpu() for h in hooks}
        self.target_mlp = {l: acts[n][:b].float() for l, n in zip(self.mlp_layers, mlp_names)}
        del acts
        with few_threads(1):
            self._prepare(reference)

    def _prepare(self, reference: Reference) -> None:
        # eigen-decomposition of J J^T per (image, token): the one-token case of null_fraction
        self.eig = {}
        for h, J in self.jac.items():
            Jt = J.transpose(1, 2).double()                       # [B, T, C, D]
            ev, u = torch.linalg.eigh(Jt @ Jt.transpose(-1, -2))
            keep_ = ev > 1e-10 * ev.amax(-1, keepdim=True).clamp_min(1e-30)
            self.eig[h] = (Jt, u, ev.clamp_min(1e-30), keep_)

        # ---- dormant-pathway bounds ----------------------------------------------------------
        m = self.th["dormant_margin"]
        self.bounds: dict[int, dict[str, Tensor]] = {}
        self.target_dormant: list[dict] = []
        for l in self.mlp_layers:
            self.bounds[l] = {}
            for c, r in reference.neurons[l].items():
                nmax, nmed = r["max"].float(), r["median"].float()
                bound = nmax + m * (nmax - nmed).clamp_min(0) + 1e-6
                self.bounds[l][c] = bound.to(self.target_mlp[l].device)
                t = self.target_mlp[l][:, self._tok_slice(c)]
                if t.shape[1]:
                    for u in torch.nonzero(t.amax(1).amax(0) > self.bounds[l][c]).flatten().tolist():
                        self.target_dormant.append({"layer": l, "neuron": u, "class": c})

        mlp_names = [f"blocks.{l}.mlp.hook_post" for l in self.mlp_layers]
        self.vecs: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.nullf: dict[tuple[int, int], float] = {}
        self.shift: dict[tuple[int, int], float] = {}
        self.dormant: list[list[dict]] = [[] for _ in self.variants]
        self.observers = ([(h, self._observe_site) for h in self.hooks]
                          + [(n, self._observe_mlp) for n in mlp_names])

    def _tok_slice(self, cls: str) -> slice:
        return slice(0, self.n_prefix) if cls == "prefix" else slice(self.n_prefix, None)

    # ---- observers ---------------------------------------------------------------------------
    def _observe_site(self, hook: str, act: Tensor, chunk: Tensor) -> None:
        with few_threads(1):
            self._observe_site_(hook, act, chunk)

    def _observe_site_(self, hook: str, act: Tensor, chunk: Tensor) -> None:
        b = self.b
        if act.shape[0] != len(chunk) * b:
            return
        v = vectors(act, self.specs[hook])
        a4 = v.reshape(len(chunk), b, v.shape[1], v.shape[2])
        nat = self.natural[hook]
        in_chunk = {int(vi): j for j, vi in enumerate(chunk.tolist())}
        single: list[tuple[int, int, int, int]] = []
        for vi, si in self.by_hook[hook]:
            j = in_chunk.get(vi)
            if j is None:
                continue
            rs = self.resolved[vi][si]
            toks = (torch.arange(v.shape[1]) if rs.tokens is None or v.shape[1] == 1
                    else rs.tokens.cpu())
            if len(toks) == 1:
                single.append((vi, si, j, int(toks[0])))
                continue
            vec = a4[j][:, toks].float().cpu()                              # [B, k, D]
            delta = vec - nat[:, toks]
            self._store(hook, vi, si, vec, toks)
            self.shift[(vi, si)] = float(delta.reshape(b, -1).norm(dim=1).mean())
            if self.behaviour:
                from patchlens.diagnostics.behaviour import null_fraction

                J = self.jac[hook][:, :, toks].reshape(b, self.jac[hook].shape[1], -1)
                dl = delta.reshape(b, -1)
                energy = (dl**2).sum(1)
                if float(energy.sum()) > 0:
                    f = null_fraction(dl, J).nan_to_num(0.0)
                    self.nullf[(vi, si)] = float((f * energy).sum() / energy.sum())
        if single:  # one token per variant (layer x token sweeps): vectorised
            js = torch.tensor([s[2] for s in single])
            ts = torch.tensor([s[3] for s in single])
            vec = a4[js, :, ts].float().cpu()                                # [n, B, D]
            delta = vec - nat[:, ts].transpose(0, 1)
            shift = delta.norm(dim=-1).mean(1)
            nullf = torch.full((len(single),), float("nan"))
            if self.behaviour:
                Jt, u, ev, keep = self.eig[hook]
                Jsel = Jt[:, ts].transpose(0, 1)                             # [n, B, C, D]
                a = torch.einsum("nbcd,nbd->nbc", Jsel, delta.double())
                c = torch.einsum("nbc,nbce->nbe", a, u[:, ts].transpose(0, 1))
                inside = ((c**2 / ev[:, ts].transpose(0, 1)) * keep[:, ts].transpose(0, 1)).sum(-1)
                energy = (delta.double() ** 2).sum(-1)                     # [n, B]
                inside = torch.minimum(inside, energy)
                tot = energy.sum(1)
                nullf = torch.where(tot > 0, 1 - inside.sum(1) / tot.clamp_min(1e-30),
                                    torch.full_like(tot, float("nan"))).float()
            for i, (vi, si, _, t) in enumerate(single):
                self._store(hook, vi, si, vec[i][:, None], torch.tensor([t]))
                self.shift[(vi, si)] = float(shift[i])
                if not math.isnan(float(nullf[i])):
                    self.nullf[(vi, si)] = float(nullf[i])

    def _store(self, hook: str, vi: int, si: int, vec: Tensor, toks: Tensor) -> None:
        """Keep the patched vectors ``[B, k, D]`` by token class (subsampled)."""
        out: dict[str, Tensor] = {}
        if vec.shape[1] == 1 and "all" in self.ref.samples[hook] and toks.numel() == 1 \
                and self.specs[hook].token_axis is None:
            out["all"] = vec[:, 0]
        else:
            cls = ["prefix" if t < self.n_prefix else "patches" for t in toks.tolist()]
            for c in ("prefix", "patches"):
                sel = [i for i, x in enumerate(cls) if x == c]
                if sel:
                    out[c] = vec[:, sel].reshape(-1, vec.shape[-1])
        for c, pv in out.items():
            if pv.shape[0] > self.max_vectors:
                g = torch.Generator().manual_seed(vi * 1009 + si)
                pv = pv[torch.randperm(pv.shape[0], generator=g)[: self.max_vectors]]
            out[c] = pv
        self.vecs[(vi, si)] = out

    def _observe_mlp(self, hook: str, act: Tensor, chunk: Tensor) -> None:
        # large reductions: on torch's whole thread pool (unlike `_observe_site`)
        b = self.b
        if act.shape[0] != len(chunk) * b:
            return
        layer = int(hook.split(".")[1])
        n = len(chunk)
        tgt = self.target_mlp[layer]
        for c, bound in self.bounds[layer].items():
            sl = self._tok_slice(c)
            ac = act[:, sl]                                                 # [Vc*B, t, U]
            if ac.shape[1] == 0:
                continue
            # reduce the token axis first, then the images: one pass over contiguous rows
            # (amax over the two middle axes at once is ~30x slower on CPU)
            mx = ac.amax(1).view(n, b, -1).amax(1)                          # [Vc, U]
            cand = mx > bound
            if not bool(cand.any()):
                continue
            units = torch.nonzero(cand.any(0)).flatten()
            t = tgt[:, sl][..., units]                                      # [B, t, u]
            # beyond the natural bound AND beyond the unpatched target at the same position:
            # the intervention, not the target image, drives the neuron there
            thr = torch.maximum(bound[units], t + 1e-4 * (1 + t.abs()))
            ex = (ac[..., units].view(n, b, -1, len(units)) - thr).amax(2).amax(1)  # [Vc, u]
            for j, ui in torch.nonzero(ex > 0).tolist():
                vi = int(chunk[j])
                if layer < self.down[vi]:
                    continue
                unit = int(units[ui])
                r = self.ref.neurons[layer][c]
                nmax, nmed = float(r["max"][unit]), float(r["median"][unit])
                self.dormant[vi].append({
                    "layer": layer, "neuron": unit, "class": c, "value": float(mx[j, unit]),
                    "natural_max": nmax, "natural_median": nmed,
                    "excess": (float(mx[j, unit]) - nmax) / max(nmax - nmed, 1e-6)})

    # ---- the report --------------------------------------------------------------------------
    def report(self, effects: Tensor | None = None) -> DivergenceReport:
        with few_threads(1):  # small matrices: thread-pool overhead dominates otherwise
            return self._report(effects)

    def _report(self, effects: Tensor | None = None) -> DivergenceReport:
        th, ref, variants = self.th, self.ref, self.variants
        v_total = len(variants)
        pools: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
        sizes: dict[tuple[str, str], int] = defaultdict(int)
        rows: list[dict] = []
        slices: list[tuple[int, tuple[str, str], int, int]] = []
        for vi, rss in enumerate(self.resolved):
            for si, rs in enumerate(rss):
                for c, pv in self.vecs.get((vi, si), {}).items():
                    key = (rs.hook, c)
                    start = sizes[key]
                    pools[key].append(pv)
                    sizes[key] += pv.shape[0]
                    slices.append((len(rows), key, start, sizes[key]))
                    rows.append({"variant": vi, "label": variants[vi].label, "site": si,
                                 "hook": rs.hook, "class": c, "n": pv.shape[0],
                                 "null_fraction": self.nullf.get((vi, si), float("nan")),
                                 "shift": self.shift.get((vi, si), float("nan"))})
        pooled = {key: torch.cat(parts) for key, parts in pools.items()}
        pct_by_key, norm_by_key = {}, {}
        for key, allv in pooled.items():
            scorer = ref.scorer(*key)
            scores = scorer.scores(allv)
            pct_by_key[key] = scorer.percentiles(scores)
            norm_by_key[key] = scores["norm_ratio"]
        ot_rows = []
        if self.ot:
            for key, allv in pooled.items():
                ot_rows.append(self._ot(key, allv))

        for lst in self.dormant:
            lst.sort(key=lambda e: -e["excess"])
        eff = None
        if effects is not None:
            eff = torch.as_tensor(effects).detach().float().cpu()
            if eff.numel() != v_total:
                raise InputError(f"effects has {eff.numel()} values for {v_total} variants.")
        flat_eff = None if eff is None else eff.flatten()
        for ri, key, s, e in slices:
            r = rows[ri]
            pct = {m: v[s:e] for m, v in pct_by_key[key].items()}
            beyond = torch.stack([pct[m] for m in ("mahalanobis", "knn", "local_pca")]).amax(0)
            for m in MEASURES:
                r[f"{m}_pct"] = float(pct[m].mean())
            r["norm_ratio"] = float(norm_by_key[key][s:e].mean())
            r["outlier_rate"] = float((beyond >= th["outlier_pct"]).float().mean())
            r["ot_ratio"] = float("nan")
            if self.ot == "variant" and r["n"] >= 50:
                r["ot_ratio"] = self._ot(key, pooled[key][s:e])["ratio"]
            r["n_dormant"] = len(self.dormant[r["variant"]])
            if self.sae_columns is not None:  # feature-space inputs (patchlens/diagnostics/sae.py)
                r.update(self.sae_columns.row(key[0], key[1], pooled[key][s:e], ref))
            r["effect"] = float("nan") if flat_eff is None else float(flat_eff[r["variant"]])
            divergent = r["outlier_rate"] > th["outlier_rate"] or (
                not math.isnan(r["ot_ratio"]) and r["ot_ratio"] > th["ot_ratio"])
            r["verdict"] = ("divergent-pernicious" if r["n_dormant"] else
                            "divergent-harmless" if divergent else "natural")
        rep = DivergenceReport(rows, ot_rows, self.dormant, th, effects=eff,
                               meta={"labels": [v.label for v in variants], "n_images": self.b,
                                     "target_dormant": self.target_dormant})
        if eff is not None and eff.ndim > 1:
            rep.shape = tuple(eff.shape)
        return rep

    def _ot(self, key: tuple[str, str], vecs: Tensor) -> dict:
        """Sinkhorn ratio of ``vecs`` at a (hook, class); the natural-vs-natural baseline is
        cached on the reference per sample size."""
        nat = self.ref.natural(*key)
        stats = self.ref.stats[key[0]][key[1]]
        if vecs.shape[0] < MIN_OT:  # a distance between a handful of points says nothing
            return {"hook": key[0], "class": key[1], "distance": float("nan"),
                    "baseline": float("nan"), "ratio": float("nan"), "n": vecs.shape[0],
                    "note": f"{vecs.shape[0]} patched vectors; the Sinkhorn ratio needs at "
                            f"least {MIN_OT}"}
        try:
            r = ot_divergence(vecs, nat, max_samples=self.ot_samples, stats=stats,
                              baseline_cache=self.ref._ot_baselines, cache_key=key)
            return {"hook": key[0], "class": key[1], "distance": r.distance,
                    "baseline": r.baseline, "ratio": r.ratio, "n": r.n_patched}
        except InputError as e:
            return {"hook": key[0], "class": key[1], "distance": float("nan"),
                    "baseline": float("nan"), "ratio": float("nan"), "n": 0, "note": str(e)}


def diagnose(model, target: Tensor, variants: Sequence, reference: Reference, *,
             effects: Tensor | None = None, behaviour: bool = True, ot: bool | str = "site",
             ot_samples: int = 256, max_vectors: int = 256, memory_budget: str | int = "2GB",
             thresholds: dict[str, float] | None = None, warn: bool = False,
             sae: Any = None) -> DivergenceReport:
    """Measure how divergent each variant's patched activations are (one engine run).

    Args:
        target: the batch the variants patch ``[B, C, H, W]``.
        variants: `Variant` list (as given to `run_variants`).
        reference: a `Reference` fitted on this model at every hook the variants patch.
        effects: ``[V]`` (or the sweep's shape) effect per variant, for the warning and plot.
        behaviour: the null-space fraction of each shift (Jacobian of the logits at the
            unpatched target: one batched backward pass for all sites).
        ot: ``"site"``: one Sinkhorn ratio per (site hook, token class) over all patched vectors
            there; ``"variant"``: also one per (variant, site) with at least 50 vectors (used in
            the verdict); False: none. ``ot_samples`` caps the natural set (two halves).
        max_vectors: patched vectors kept per (variant, site) (uniform subsample).
        memory_budget: activation memory per engine chunk.
        sae: a sparse autoencoder (or a list, or ``{hook: sae}``) trained at hooks the variants
            patch: adds its feature-space measures to the rows (`patchlens.diagnostics.sae`).
    """
    from patchlens.patching.engine import run_variants

    col = _Collector(model, target, variants, reference, behaviour=behaviour, ot=ot,
                     ot_samples=ot_samples, max_vectors=max_vectors, thresholds=thresholds,
                     sae=sae)
    run_variants(model, target, variants, observers=col.observers, memory_budget=memory_budget,
                 progress=False, return_type="pooled")
    rep = col.report(effects)
    if warn:
        _warn(rep)
    return rep


def assess(patched, natural, *, downstream=None, thresholds: dict[str, float] | None = None,
           readout=None, delta=None) -> dict[str, Any]:
    """The same verdict on plain tensors: ``patched [M, D]`` vs ``natural [N, D]``.

    Args:
        downstream: ``f(x [n, D]) -> [n, U]`` the computation that follows (e.g. a ReLU layer);
            its units on ``patched`` are compared with their range on ``natural``.
        readout: ``W [C, D]``, a linear readout for the behavioural split of ``delta``
            (``patched - natural`` row by row if not given and the shapes match).
    """
    from patchlens.diagnostics.behaviour import readout_null_fraction
    from patchlens.diagnostics.measures import NaturalScorer, dormant_units

    th = {**THRESHOLDS, **(thresholds or {})}
    p, q = torch.as_tensor(patched, dtype=torch.float32), torch.as_tensor(natural, dtype=torch.float32)
    scorer = NaturalScorer(q)
    pct = scorer.percentiles(scorer.scores(p))
    beyond = torch.stack([pct[m] for m in ("mahalanobis", "knn", "local_pca")]).amax(0)
    out: dict[str, Any] = {f"{m}_pct": float(v.mean()) for m, v in pct.items()}
    out["outlier_rate"] = float((beyond >= th["outlier_pct"]).float().mean())
    r = ot_divergence(p, q)
    out.update(ot_distance=r.distance, ot_baseline=r.baseline, ot_ratio=r.ratio)
    out["dormant"] = []
    if downstream is not None:
        nat_u, pat_u = downstream(q), downstream(p)
        med = nat_u.median(0).values
        mask = dormant_units(pat_u, nat_u.amax(0), med, th["dormant_margin"])
        out["dormant"] = torch.nonzero(mask).flatten().tolist()
    if readout is not None:
        d = delta if delta is not None else p - q[: p.shape[0]]
        out["null_fraction"] = float(readout_null_fraction(d, readout).nanmean())
    divergent = out["outlier_rate"] > th["outlier_rate"] or r.ratio > th["ot_ratio"]
    out["verdict"] = ("divergent-pernicious" if out["dormant"] else
                      "divergent-harmless" if divergent else "natural")
    return out
__all__ = ["THRESHOLDS", "VERDICTS", "DivergenceReport", "assess", "diagnose", "diagnose_sweep"]
