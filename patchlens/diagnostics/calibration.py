"""Calibration of the divergence verdict: known-natural and known-divergent interventions.

A verdict is a judgment the library makes for the user, so it is measured like a number: on a
model and natural images, every case below is run through `diagnose` at every site and token
class, and the false-alarm rate (natural cases not called ``natural``) and the detection rate
(divergent cases called ``divergent-*``) are counted. ``benchmarks/divergence_calibration.py``
runs it on the zoo models (docs/divergence.md has the table); `calibrate` runs it on yours.

Natural cases (must come out ``natural``):

- ``unpatched``: the held-out target's own activations (``Scale(1)``);
- ``self-patch``: ``Interchange(target)`` into the target;
- ``layer from image (same class)`` / ``(other class)``: every token of the site taken from
  another natural image of the same / another digit class (at a residual site, the run from
  there on *is* that image's natural run).

Known-divergent cases (must come out ``divergent-*``):

- ``zero``, ``scale x0``, ``scale x0.1``, ``scale x10``: ``Zero()`` / ``Scale(a)`` on the class;
- ``mean of class, one token``: one token set to the natural mean of its class, at the sites
  where that mean is unlike every token: natural vectors lie on a shell around their mean, and
  there the mean's norm is below every natural vector's by more than 10% of the median norm
  (elsewhere the mean is nearer to natural vectors than they are to each other, and mean
  ablation is not a known-divergent case);
- ``random vector (large)``: each token set to a random vector ``large`` times the natural
  median norm;
- ``steering (large)``: the difference of two digit classes' natural means, rescaled to
  ``large`` times the natural median norm, added to every token of the class;
- ``another layer``: the target's own activations at the same hook in the most distant layer
  (layer 0 for the later half, the last layer for the earlier half).

Probes (reported, no expected verdict): ``adjacent layer`` and ``layer 3 away`` (the same hook
one / three layers away: residual vectors of nearby layers overlap, see docs/divergence.md) and
``steering (x0.5)``.

The paper's toy ReLU case (`neurons.toy_relu_case`, expected ``divergent-pernicious``) is run
by `toy_rows` through `assess`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from patchlens.diagnostics.reference import token_classes, vectors
from patchlens.errors import InputError

NATURAL = ("unpatched", "self-patch", "layer from image (same class)",
           "layer from image (other class)")
DIVERGENT = ("zero", "scale x0", "scale x0.1", "scale x10", "mean of class, one token",
             "random vector (large)", "steering (large)", "another layer")
PROBES = ("adjacent layer", "layer 3 away", "steering (x0.5)")
LARGE = 3.0
MEAN_MARGIN = 0.1  # "unlike every token": mean norm below every natural norm by 10% of the median  # "large" vectors: this many times the natural median norm of the site and class


def kind_of(case: str) -> str:
    """``natural``, ``divergent``, ``probe`` or ``pernicious`` (the toy case)."""
    if case in NATURAL:
        return "natural"
    if case in DIVERGENT:
        return "divergent"
    return "pernicious" if case == "toy ReLU" else "probe"


@dataclass
class Pool:
    """What the cases are built from, fixed independently of the reference under test: per
    (hook, class) the natural median norm, the class mean and whether it is far from every
    natural vector, and a steering direction (difference of two digit classes' means)."""

    median_norm: dict[tuple[str, str], float]
    mean: dict[tuple[str, str], Tensor]
    mean_far: dict[tuple[str, str], bool]
    steer: dict[tuple[str, str], Tensor]


def case_pool(model, images: Tensor, labels: Tensor, hooks: Sequence[str]) -> Pool:
    """Build a `Pool` from natural ``images`` ``[N, C, H, W]`` with digit ``labels`` ``[N]``."""
    layout = model.layout
    out = Pool({}, {}, {}, {})
    with torch.inference_mode():
        _, cache = model.run_with_cache(images, names_filter=list(hooks), return_type=None)
    a, b = (int(v) for v in torch.unique(labels)[:2])
    for h in hooks:
        spec = model.hook_spec(h)
        v = vectors(cache[h], spec).float()
        for c, toks in token_classes(spec, layout.prefix, v.shape[1]).items():
            sel = v if toks is None else v[:, toks]                     # [N, t, D]
            rows = sel.reshape(-1, v.shape[-1])
            key = (h, c)
            out.median_norm[key] = float(rows.norm(dim=1).median())
            mean = rows.mean(0)
            out.mean[key] = mean
            diff = sel[labels == a].mean((0, 1)) - sel[labels == b].mean((0, 1))
            if float(diff.norm()) <= 1e-6 * float(mean.norm()):  # a constant class: any direction
                diff = torch.randn(diff.shape, generator=torch.Generator().manual_seed(0))
            out.steer[key] = diff / diff.norm()
            # the natural vectors lie on a shell: is the mean inside it, its norm below every
            # natural vector's? (a constant class's mean is its one natural vector)
            norms = rows.norm(dim=1)
            spread = float(rows.std(0).square().mean().sqrt())
            constant = spread <= 1e-5 * float(norms.mean())
            out.mean_far[key] = not constant and float(mean.norm()) < float(
                norms.min()) - MEAN_MARGIN * float(norms.median())
    return out


def _same_hook_at(model, hook: str, layer: int) -> str:
    """The hook of the same kind as ``hook`` (its schema alias) in block ``layer``."""
    alias = model.hook_spec(hook).alias
    for spec in model.hook_specs.values():
        if spec.alias == alias and spec.layer == layer:
            return spec.name
    raise InputError(f"{hook} has no counterpart in block {layer}.")


def cases(model, target: Tensor, same: Tensor, other: Tensor, hooks: Sequence[str], pool: Pool,
          large: float = LARGE, probes: bool = True, seed: int = 0) -> list:
    """The `Variant` list of every case at every hook and token class on ``target [B, ...]``
    (``same`` / ``other``: natural images of the same / another class, one per target image).
    Each variant's ``meta`` holds ``case`` (its rows' token classes come from the report)."""
    from patchlens.patching import Interchange, Scale, Site, Variant, Zero
    from patchlens.patching.interventions import Add, Stored

    layout = model.layout
    n_layers = model.cfg.n_layers
    g = torch.Generator().manual_seed(seed)
    other_hooks = {}
    for h in hooks:
        layer = model.hook_spec(h).layer
        if layer is None:
            raise InputError(f"Calibration cases need hooks inside the blocks; {h} is not.")
        far = 0 if layer >= n_layers / 2 else n_layers - 1
        other_hooks[h] = {"another layer": _same_hook_at(model, h, far)}
        if probes:
            up = layer + 1 if layer + 1 < n_layers else layer - 1
            other_hooks[h]["adjacent layer"] = _same_hook_at(model, h, up)
            other_hooks[h]["layer 3 away"] = _same_hook_at(model, h, (layer + 3) % n_layers)
    need = sorted({o for d in other_hooks.values() for o in d.values()})
    with torch.inference_mode():
        _, own = model.run_with_cache(target, names_filter=need, return_type=None)

    out = []
    # one object per source: the engine runs each source once for all its hooks
    self_iv = Interchange(target, "target")
    same_iv, other_iv = Interchange(same, "same class"), Interchange(other, "other class")
    keep = Scale(1.0)

    def add(case, hook, tokens, iv, cls):
        out.append(Variant([(Site(hook, tokens=tokens), iv)], (case, hook, cls),
                           meta={"case": case}))

    for h in hooks:
        n_tok = layout.n_tokens
        classes = token_classes(model.hook_spec(h), layout.prefix, n_tok)
        add("layer from image (same class)", h, "all", same_iv, "all")
        add("layer from image (other class)", h, "all", other_iv, "all")
        for c, toks in classes.items():
            t = toks.tolist()
            key = (h, c)
            add("unpatched", h, t, keep, c)
            add("self-patch", h, t, self_iv, c)
            add("zero", h, t, Zero(), c)
            add("scale x0", h, t, Scale(0.0), c)
            add("scale x0.1", h, t, Scale(0.1), c)
            add("scale x10", h, t, Scale(10.0), c)
            d = pool.mean[key].shape[0]
            if pool.mean_far[key]:
                one = [t[len(t) // 2]]
                full = pool.mean[key].expand(1, n_tok, d).clone()
                add("mean of class, one token", h, one, Stored({h: full}, "class mean"), c)
            rnd = torch.randn(1, n_tok, d, generator=g)
            rnd = rnd / rnd.norm(dim=-1, keepdim=True) * large * pool.median_norm[key]
            add("random vector (large)", h, t, Stored({h: rnd}, "random"), c)
            add("steering (large)", h, t, Add(pool.steer[key] * large * pool.median_norm[key]), c)
            if probes:
                add("steering (x0.5)", h, t, Add(pool.steer[key] * 0.5 * pool.median_norm[key]), c)
            for case, oh in other_hooks[h].items():
                add(case, h, t, Stored({h: own[oh]}, oh), c)
    return out


def calibrate(model, references, target: Tensor, same: Tensor, other: Tensor,
              hooks: Sequence[str], pool: Pool, *, ot: bool = False, probes: bool = True,
              thresholds: dict | None = None, max_vectors: int = 64,
              seed: int = 0) -> list[dict]:
    """Run every case (`cases`) on one target batch and judge it against each of
    ``references`` (a `Reference` or a list: the patched runs do not depend on the reference,
    so the engine runs once). One dict per report row: ``reference`` (index), ``case, kind,
    hook, class, n, n_outliers, outlier_rate, measure, n_cal, ot_ratio, n_dormant, verdict``.
    With ``ot``, rows with >= 50 vectors get their own Sinkhorn ratio (reported, not judged).
    ``max_vectors``: patched vectors kept per row (a uniform subsample; the verdict is a rate).
    """
    from patchlens.diagnostics.collector import Collector
    from patchlens.patching.engine import run_variants

    refs = list(references) if isinstance(references, (list, tuple)) else [references]
    variants = cases(model, target, same, other, hooks, pool, probes=probes, seed=seed)
    col = Collector(model, target, variants, refs[0], behaviour=False,
                    ot="variant" if ot else False, thresholds=thresholds, also=refs[1:],
                    max_vectors=max_vectors)
    run_variants(model, target, variants, observers=col.observers, progress=False,
                 return_type="pooled")
    rows = []
    for i, ref in enumerate(refs):
        rep = col.report(reference=ref)
        for r in rep.rows:
            case = variants[r["variant"]].meta["case"]
            dorm = rep.dormant[r["variant"]]
            rows.append({"reference": i, "case": case, "kind": kind_of(case), "hook": r["hook"],
                         "class": r["class"], "n": r["n"], "n_outliers": r["n_outliers"],
                         "outlier_rate": r["outlier_rate"], "measure": r["measure"],
                         "n_cal": r["n_cal"], "ot_ratio": r["ot_ratio"],
                         "n_dormant": r["n_dormant"],
                         "excess": dorm[0]["excess"] if dorm else float("nan"),
                         "verdict": r["verdict"]})
    return rows


def rejudge(rows, margin: float):
    """``rows`` (a DataFrame from `calibrate` run with ``dormant_margin=0``) with the verdicts a
    dormant margin of ``margin`` gives: a divergent row is pernicious iff its largest neuron
    excess ``(value - max) / (max - median)`` exceeds ``margin``. One engine run serves every
    margin (the margin scan of docs/divergence.md)."""
    out = rows.copy()
    div = out["verdict"].str.startswith("divergent")
    pern = out["excess"].fillna(-1.0) > margin
    out.loc[div & pern, "verdict"] = "divergent-pernicious"
    out.loc[div & ~pern, "verdict"] = "divergent-harmless"
    return out


def margin_scan(rows, margins=(0.0, 1.0, 2.0, 3.0, 5.0)):
    """Per model, reference size and dormant margin: the share of detected known-divergent
    cases called pernicious and the share whose verdict differs between reference seeds
    (``rows`` as for `rejudge`; a DataFrame)."""
    import pandas as pd

    out = []
    div = rows[rows["kind"] == "divergent"]
    for m in margins:
        r = rejudge(div, m)
        for (model, n_ref), d in r.groupby(["model", "n_ref"], sort=False):
            det = d[d["verdict"].str.startswith("divergent")]
            inst = d.groupby(["case", "hook", "class", "batch"])["verdict"].nunique()
            out.append({"model": model, "reference images": n_ref, "margin": m,
                        "pernicious": round(100 * (det["verdict"] == "divergent-pernicious")
                                            .mean(), 1),
                        "seed flips": round(100 * float((inst > 1).mean()), 1)})
    return pd.DataFrame(out)


def toy_rows(n_natural: int, seed: int = 0, thresholds: dict | None = None) -> list[dict]:
    """The paper's toy ReLU case through `assess` (expected ``divergent-pernicious``)."""
    from patchlens.diagnostics.assess import assess
    from patchlens.diagnostics.neurons import toy_relu_case

    natural, patched, f = toy_relu_case(n_natural, seed)
    r = assess(patched, natural, downstream=f, thresholds=thresholds)
    nat_u = f(natural)
    mx, med = nat_u.amax(0), nat_u.median(0).values
    excess = float(((f(patched).amax(0) - mx) / (mx - med).clamp_min(1e-6)).max())
    return [{"case": "toy ReLU", "kind": "pernicious", "hook": "toy", "class": "vectors",
             "n": r["n"], "n_outliers": r["n_outliers"], "outlier_rate": r["outlier_rate"],
             "measure": r["measure"], "n_cal": r["n_cal"], "ot_ratio": r["ot_ratio"],
             "n_dormant": r["n_dormant"], "excess": excess, "verdict": r["verdict"]}]


def correct(kind: str, verdict: str) -> bool | None:
    """Whether a verdict is right for a case kind (None: a probe, or insufficient reference)."""
    if verdict == "insufficient-reference" or kind == "probe":
        return None
    if kind == "natural":
        return verdict == "natural"
    if kind == "pernicious":
        return verdict == "divergent-pernicious"
    return verdict.startswith("divergent")


# ---- tables and figure ---------------------------------------------------------------------------
_KEYS = ["model", "n_ref", "case", "kind", "site", "class"]


def count_table(rows):
    """Counts per (model, reference size, case, site, token class), over seeds and batches:
    ``n`` verdicts, how many of each verdict, ``instances`` (case x batch) and ``flips`` (the
    instances whose verdict differs between reference seeds). ``rows``: `calibrate` rows with
    ``model, n_ref, seed, batch, site`` added (a DataFrame)."""
    import pandas as pd

    df = rows.copy()
    for v, col in (("natural", "natural"), ("insufficient-reference", "insufficient"),
                   ("divergent-harmless", "harmless"), ("divergent-pernicious", "pernicious")):
        df[col] = (df["verdict"] == v).astype(int)
    counts = df.groupby(_KEYS, sort=False).agg(
        n=("verdict", "size"), natural=("natural", "sum"), insufficient=("insufficient", "sum"),
        harmless=("harmless", "sum"), pernicious=("pernicious", "sum")).reset_index()
    inst = df.groupby(_KEYS + ["hook", "batch"], sort=False)["verdict"].nunique().reset_index()
    inst["flip"] = (inst["verdict"] > 1).astype(int)
    flips = inst.groupby(_KEYS, sort=False).agg(instances=("flip", "size"),
                                                 flips=("flip", "sum")).reset_index()
    return pd.merge(counts, flips, on=_KEYS)


def _rates(c):
    """Share of right verdicts, false alarms, misses, insufficient and flips of a count table."""
    nat, div = c[c["kind"] == "natural"], c[c["kind"].isin(["divergent", "pernicious"])]
    detected = div["harmless"].sum() + div["pernicious"].sum()
    return {
        "false alarms": (nat["harmless"].sum() + nat["pernicious"].sum()) / max(nat["n"].sum(), 1),
        "detection": detected / max(div["n"].sum(), 1),
        "insufficient": (nat["insufficient"].sum() + div["insufficient"].sum())
        / max(nat["n"].sum() + div["n"].sum(), 1),
        "pernicious": div["pernicious"].sum() / max(detected, 1),
        "seed flips": (nat["flips"].sum() + div["flips"].sum())
        / max(nat["instances"].sum() + div["instances"].sum(), 1),
        "natural cases": int(nat["n"].sum()), "divergent cases": int(div["n"].sum()),
    }


ZOO_COUNTS = Path(__file__).with_name("zoo_calibration.csv")


def zoo_counts():
    """The `count_table` of the zoo models written by ``benchmarks/divergence_calibration.py
    --write-docs`` (a DataFrame)."""
    import pandas as pd

    if not ZOO_COUNTS.exists():
        raise InputError(f"{ZOO_COUNTS} is missing: run python benchmarks/"
                         "divergence_calibration.py --write-docs in a source checkout.")
    return pd.read_csv(ZOO_COUNTS)


def overall(counts):
    """Per model and reference size: false alarms, detection, insufficient reference, the
    pernicious share of detections and seed flips, in % (a DataFrame)."""
    import pandas as pd

    out = []
    for (model, n_ref), c in counts.groupby(["model", "n_ref"], sort=False):
        r = _rates(c)
        out.append({"model": model, "reference images": n_ref,
                    **{k: round(100 * v, 2) if isinstance(v, float) else v
                       for k, v in r.items()}})
    return pd.DataFrame(out)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%" if v == v else "-"


def markdown_tables(counts) -> str:
    """The calibration tables as markdown: overall per model and reference size; per case and
    token class; per site; the pernicious share per case (docs/divergence.md)."""
    lines = ["**Overall** (false alarms: natural cases called divergent; detection: "
             "known-divergent cases called divergent, an insufficient-reference verdict counts "
             "as a miss; seed flips: case instances whose verdict differs between the reference "
             "seeds)", "",
             "| model | reference images | false alarms | detection | insufficient reference "
             "| seed flips | natural / divergent verdicts |", "|---|---|---|---|---|---|---|"]
    for (model, n_ref), c in counts.groupby(["model", "n_ref"], sort=False):
        r = _rates(c)
        lines.append(f"| {model} | {n_ref} | {_pct(r['false alarms'])} | {_pct(r['detection'])} "
                     f"| {_pct(r['insufficient'])} | {_pct(r['seed flips'])} "
                     f"| {r['natural cases']} / {r['divergent cases']} |")
    refs = sorted(counts["n_ref"].unique())
    head = "| " + " | ".join(f"{n} images" for n in refs) + " |"
    lines += ["", "**Per case and token class** (both models, every site; natural cases: share "
              "called natural; divergent: share called divergent; probes: share called "
              "divergent)", "", "| case | kind | class " + head,
              "|---|---|---|" + "---|" * len(refs)]
    for (case, kind, cls), c in counts.groupby(["case", "kind", "class"], sort=False):
        cells = []
        for n in refs:
            d = c[c["n_ref"] == n]
            good = (d["natural"].sum() if kind == "natural"
                    else d["harmless"].sum() + d["pernicious"].sum())
            cells.append(_pct(good / max(d["n"].sum(), 1)) if d["n"].sum() else "-")
        lines.append(f"| {case} | {kind} | {cls} | " + " | ".join(cells) + " |")
    lines += ["", "**Per site and token class** (both models: false alarms / detection)", "",
              "| site | class " + head, "|---|---|" + "---|" * len(refs)]
    for (site, cls), c in counts.groupby(["site", "class"], sort=False):
        if site == "toy":
            continue
        cells = []
        for n in refs:
            r = _rates(c[c["n_ref"] == n])
            cells.append(f"{_pct(r['false alarms'])} / {_pct(r['detection'])}")
        lines.append(f"| {site} | {cls} | " + " | ".join(cells) + " |")
    big = counts[counts["n_ref"] == refs[-1]]
    lines += ["", f"**Harmless or pernicious** (reference of {refs[-1]} images: share of the "
              "detected cases with a downstream neuron beyond its natural range)", "",
              "| case | detected | pernicious |", "|---|---|---|"]
    for case, c in big[big["kind"].isin(["divergent", "pernicious"])].groupby("case", sort=False):
        det = c["harmless"].sum() + c["pernicious"].sum()
        lines.append(f"| {case} | {det} | {_pct(c['pernicious'].sum() / max(det, 1))} |")
    return "\n".join(lines) + "\n"


def figure(counts):
    """Plotly figure: false alarms, detection, insufficient reference and seed flips against
    the reference size (one panel per model), and the detection of each case at the largest
    reference size."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    models = list(dict.fromkeys(counts["model"]))
    fig = make_subplots(rows=1, cols=len(models) + 1, subplot_titles=models + [
        f"per case, {max(counts['n_ref'])} images"], horizontal_spacing=0.07)
    colors = {"false alarms": "#d62728", "detection": "#2ca02c", "insufficient": "#7f7f7f",
              "seed flips": "#ff7f0e"}
    for i, m in enumerate(models, start=1):
        c = counts[counts["model"] == m]
        refs = sorted(c["n_ref"].unique())
        rates = [_rates(c[c["n_ref"] == n]) for n in refs]
        for key, col in colors.items():
            fig.add_trace(go.Scatter(x=refs, y=[100 * r[key] for r in rates], name=key,
                                     mode="lines+markers", line=dict(color=col),
                                     legendgroup=key, showlegend=i == 1), 1, i)
        fig.update_xaxes(type="log", title_text="reference images", row=1, col=i)
        fig.update_yaxes(title_text="% of cases", range=[-2, 102], row=1, col=i)
    big = counts[counts["n_ref"] == max(counts["n_ref"])]
    per = []
    for case, c in big[big["kind"] != "probe"].groupby("case", sort=False):
        kind = c["kind"].iloc[0]
        good = c["natural"].sum() if kind == "natural" else c["harmless"].sum() + c[
            "pernicious"].sum()
        per.append((case, kind, 100 * good / max(c["n"].sum(), 1)))
    fig.add_trace(go.Bar(x=[p[0] for p in per], y=[p[2] for p in per], showlegend=False,
                         marker_color=["#1f77b4" if p[1] == "natural" else "#2ca02c" for p in per],
                         hovertext=[p[1] for p in per]), 1, len(models) + 1)
    fig.update_layout(title="Divergence verdicts on known cases", height=420)
    return fig


__all__ = ["DIVERGENT", "LARGE", "NATURAL", "PROBES", "Pool", "calibrate", "case_pool", "cases",
           "correct", "count_table", "figure", "kind_of", "margin_scan", "markdown_tables",
           "overall", "rejudge", "toy_rows", "zoo_counts"]
