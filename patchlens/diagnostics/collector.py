"""`Collector`: reduces a sweep's patched activations to a `DivergenceReport` while it runs.

Used by `diagnose` and by ``activation_patching(..., diagnose=reference)`` (observers inside the
sweep's own engine run, so nothing is re-run).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from patchlens.diagnostics.measures import MIN_OT, few_threads, ot_divergence
from patchlens.diagnostics.neurons import neuron_bound
from patchlens.diagnostics.reference import Reference, class_of_tokens, token_classes, vectors
from patchlens.diagnostics.result import DivergenceReport
from patchlens.diagnostics.sae import SAEColumns
from patchlens.diagnostics.scorer import needed_vectors
from patchlens.diagnostics.verdict import evidence, vector_evidence, verdict
from patchlens.diagnostics.verdict import thresholds as resolve_thresholds
from patchlens.errors import InputError

MAX_JACOBIAN_OUTPUTS = 16  # logits kept in the behavioural Jacobian (the largest on the target)
MIN_OT_VARIANT = 50  # patched vectors a row needs for its own Sinkhorn ratio (ot="variant")


def first_downstream_mlp(model, spec) -> int:
    """First layer whose ``mlp.hook_post`` an intervention at hook ``spec`` can change (the
    hook schema's forward order)."""
    n_layers = model.cfg.n_layers
    if spec.stage != "block":
        return 0 if spec.stage == "embed" else n_layers
    post = model.hook_specs.get(f"blocks.{spec.layer}.mlp.hook_post")
    return spec.layer + 1 if post is None or spec.order >= post.order else spec.layer


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


class Collector:
    """Reduces a sweep's patched activations to per-variant statistics while the engine runs.

    Setup (once): one forward and one backward pass of the unpatched target, repeated once per
    output row, give the natural vectors at every site hook, the Jacobian of the logits (at most
    `MAX_JACOBIAN_OUTPUTS`, the largest on the target) w.r.t. every site hook at once, and the
    target's own MLP activations. During the run, the observers keep each variant's patched
    vectors (at most ``max_vectors`` per variant and site, a fixed uniform subsample), its
    null-space fraction and the downstream neurons beyond their natural range. ``report``
    scores all vectors of a (site, class) in one batch and applies `verdict.verdict` per row.
    """

    def __init__(self, model, target: Tensor, variants: Sequence, reference: Reference, *,
                 behaviour: bool = True, ot: bool | str = "site", ot_samples: int = 256,
                 max_vectors: int = 256, thresholds: dict[str, float] | None = None,
                 also: Sequence[Reference] = (), sae: Any = None):
        from patchlens.patching.engine import capture, start_layer

        self.th = resolve_thresholds(thresholds)
        self.refs = [reference, *also]  # `report` can be asked about any of them
        for ref in self.refs:
            if not isinstance(ref, Reference):
                raise InputError(f"reference must be a fitted patchlens.diagnostics.Reference, "
                                 f"got {ref!r}; fit one with Reference.fit(model, images, "
                                 "sites).")
            ref.check_model(model)
        model.check_images(target)
        if len(variants) == 0:
            raise InputError("No variants to diagnose.")
        if ot not in (False, "site", "variant", True):
            raise InputError(f"ot must be False, 'site' or 'variant'; got {ot!r}.")
        self.model, self.variants = model, variants
        self.behaviour, self.ot = behaviour, ("site" if ot is True else ot)
        self.ot_samples, self.max_vectors = ot_samples, max_vectors
        self.b = b = target.shape[0]
        n_layers = model.cfg.n_layers
        grid = (target.shape[-2] // model.cfg.patch_size[0],
                target.shape[-1] // model.cfg.patch_size[1])
        layout = model.layout_for(tuple(target.shape[-2:]))
        self.prefix = layout.prefix
        self.resolved = [[rs for site, _ in v.pairs for rs in site.resolve(model, grid)]
                         for v in variants]
        if any(rs.per_image for rss in self.resolved for rs in rss):
            raise InputError("Divergence diagnostics take one token selection for every image; "
                             "a per-image selection (mask [batch, gh, gw] or a list of Rect) "
                             "is not supported yet. Diagnose each image separately.")
        hooks = sorted({rs.hook for rss in self.resolved for rs in rss})
        for h in hooks:
            for ref in self.refs:
                ref.check_hook(h)
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
        self.mlp_layers = [l for l in range(n_layers) if all(l in r.neurons for r in self.refs)
                           and f"blocks.{l}.mlp.hook_post" in model.hook_dict]
        by_hook: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for vi, rss in enumerate(self.resolved):
            for si, rs in enumerate(rss):
                by_hook[rs.hook].append((vi, si))
        self.by_hook = by_hook

        # ---- one forward + backward on the unpatched target (through the engine) ----------
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
            self._prepare()

    def _bounds(self, ref: Reference) -> dict[int, dict[str, Tensor]]:
        """Per layer and token class, `neuron_bound` of every MLP neuron under ``ref``."""
        m = self.th["dormant_margin"]
        return {l: {c: neuron_bound(r["max"], r["median"], m).to(self.target_mlp[l].device)
                    for c, r in ref.neurons[l].items() if c in self.slices}
                for l in self.mlp_layers}

    def _prepare(self) -> None:
        # eigen-decomposition of J J^T per (image, token): the one-token case of null_fraction
        self.eig = {}
        for h, J in self.jac.items():
            Jt = J.transpose(1, 2).double()                       # [B, T, C, D]
            ev, u = torch.linalg.eigh(Jt @ Jt.transpose(-1, -2))
            keep_ = ev > 1e-10 * ev.amax(-1, keepdim=True).clamp_min(1e-30)
            self.eig[h] = (Jt, u, ev.clamp_min(1e-30), keep_)

        # ---- dormant-pathway bounds (the loosest over the references, to find candidates) --
        self.slices: dict[str, slice] = {}
        for l in self.mlp_layers:
            for c, toks in token_classes(None, self.prefix, self.target_mlp[l].shape[1]).items():
                self.slices[c] = slice(int(toks.min()), int(toks.max()) + 1)
        per_ref = [self._bounds(r) for r in self.refs]
        self.bounds = {l: {c: torch.stack([b[l][c] for b in per_ref]).amin(0)
                           for c in per_ref[0][l]} for l in self.mlp_layers}

        mlp_names = [f"blocks.{l}.mlp.hook_post" for l in self.mlp_layers]
        self.vecs: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.nullf: dict[tuple[int, int], float] = {}
        self.shift: dict[tuple[int, int], float] = {}
        # per variant: (layer, neuron, class, value) beyond the loosest bound and the target
        self.raw_dormant: list[list[tuple]] = [[] for _ in self.variants]
        self.mlp_layer_of = dict(zip(mlp_names, self.mlp_layers))
        self.observers = ([(h, self._observe_site) for h in self.hooks]
                          + [(n, self._observe_mlp) for n in mlp_names])

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
        if vec.shape[1] == 1 and "all" in self.refs[0].samples[hook] and toks.numel() == 1 \
                and self.specs[hook].token_axis is None:
            out["all"] = vec[:, 0]
        else:
            cls = class_of_tokens(self.prefix, toks.tolist())
            for c in dict.fromkeys(cls):
                sel = [i for i, x in enumerate(cls) if x == c]
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
        layer = self.mlp_layer_of[hook]
        n = len(chunk)
        tgt = self.target_mlp[layer]
        for c, bound in self.bounds[layer].items():
            sl = self.slices[c]
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
            # beyond the unpatched target at the same position (the intervention, not the
            # target image, drives the neuron there): the largest such value per variant
            a = ac[..., units].view(n, b, -1, len(units))
            beyond = torch.where(a > t + 1e-4 * (1 + t.abs()), a, torch.full_like(a, -torch.inf))
            top = beyond.amax(2).amax(1)                                    # [Vc, u]
            for j, ui in torch.nonzero(top > bound[units]).tolist():
                vi = int(chunk[j])
                if layer < self.down[vi]:
                    continue
                self.raw_dormant[vi].append((layer, int(units[ui]), c, float(top[j, ui])))

    # ---- the report --------------------------------------------------------------------------
    def report(self, effects: Tensor | None = None,
               reference: Reference | None = None) -> DivergenceReport:
        """The report against ``reference`` (default: the one given first; others must have
        been passed as ``also``)."""
        ref = self.refs[0] if reference is None else reference
        if not any(ref is r for r in self.refs):
            raise InputError("This collector was not prepared for that reference; pass it as "
                             "`also=[...]` when building the collector.")
        with few_threads(1):  # small matrices: thread-pool overhead dominates otherwise
            return self._report(effects, ref)

    def _dormant(self, ref: Reference) -> list[list[dict]]:
        """Per variant, the raw records beyond ``ref``'s own bounds, largest excess first."""
        bounds = self._bounds(ref)
        out = []
        for recs in self.raw_dormant:
            lst = []
            for layer, unit, c, value in recs:
                if value <= float(bounds[layer][c][unit]):
                    continue
                r = ref.neurons[layer][c]
                nmax, nmed = float(r["max"][unit]), float(r["median"][unit])
                lst.append({"layer": layer, "neuron": unit, "class": c, "value": value,
                            "natural_max": nmax, "natural_median": nmed,
                            "n_natural": ref.meta["neuron_counts"][str(layer)][c],
                            "excess": (value - nmax) / max(nmax - nmed, 1e-6)})
            out.append(sorted(lst, key=lambda e: -e["excess"]))
        return out

    def _target_dormant(self, ref: Reference) -> list[dict]:
        """Neurons the unpatched target itself drives beyond ``ref``'s bounds."""
        bounds = self._bounds(ref)
        out = []
        for l in self.mlp_layers:
            for c, bound in bounds[l].items():
                t = self.target_mlp[l][:, self.slices[c]]
                for u in torch.nonzero(t.amax(1).amax(0) > bound).flatten().tolist():
                    out.append({"layer": l, "neuron": u, "class": c})
        return out

    def _report(self, effects: Tensor | None, ref: Reference) -> DivergenceReport:
        th, variants = self.th, self.variants
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
                                 "hook": rs.hook, "class": c,
                                 "null_fraction": self.nullf.get((vi, si), float("nan")),
                                 "shift": self.shift.get((vi, si), float("nan"))})
        pooled = {key: torch.cat(parts) for key, parts in pools.items()}
        scored = {}
        for key, allv in pooled.items():
            try:
                scorer = ref.scorer(*key)
            except InputError:  # too few natural vectors: rows say insufficient-reference
                scorer = None
            if scorer is None:
                scored[key] = (None, None, torch.ones(allv.shape[0]))
            else:
                scores = scorer.scores(allv)
                scored[key] = (scorer, scores, scorer.pvalues(scores=scores))
        ot_rows = [self._ot(ref, key, allv) for key, allv in pooled.items()] if self.ot else []
        dormant = self._dormant(ref)
        eff = None
        if effects is not None:
            eff = torch.as_tensor(effects).detach().float().cpu()
            if eff.numel() != v_total:
                raise InputError(f"effects has {eff.numel()} values for {v_total} variants.")
        flat_eff = None if eff is None else eff.flatten()
        alpha = th["alpha"]
        for ri, key, s, e in slices:
            r = rows[ri]
            scorer, scores, pv = scored[key]
            per = ref.vectors_per_image(*key)
            need = needed_vectors(alpha)
            r.update(vector_evidence(
                scorer, None if scores is None else {m: v[s:e] for m, v in scores.items()},
                pv[s:e], th, needed=need, needed_images=-(-need // per),
                n_images_ref=ref.meta["n_images"]))
            r["ot_ratio"] = float("nan")
            if self.ot == "variant" and r["n"] >= MIN_OT_VARIANT:
                r["ot_ratio"] = self._ot(ref, key, pooled[key][s:e])["ratio"]
            if self.sae_columns is not None:  # feature-space measures (diagnostics/sae.py)
                r.update(self.sae_columns.row(key[0], key[1], pooled[key][s:e], ref))
            dorm = dormant[r["variant"]]
            r["n_dormant"] = len(dorm)
            r["neurons"] = ", ".join(
                f"L{d['layer']}.{d['neuron']} ({d['class']}) {d['value']:.2f} > natural max "
                f"{d['natural_max']:.2f} of {d['n_natural']}" for d in dorm[:3]) + (
                f" and {len(dorm) - 3} more" if len(dorm) > 3 else "")
            r["effect"] = float("nan") if flat_eff is None else float(flat_eff[r["variant"]])
            r["verdict"] = verdict(r["n"], r["n_outliers"], r["n_dormant"], r["sufficient"], th)
            r["evidence"] = evidence(r, th)
        rep = DivergenceReport(rows, ot_rows, dormant, th, effects=eff,
                               meta={"labels": [v.label for v in variants], "n_images": self.b,
                                     "n_images_ref": ref.meta["n_images"],
                                     "target_dormant": self._target_dormant(ref)})
        if eff is not None and eff.ndim > 1:
            rep.shape = tuple(eff.shape)
        return rep

    def _ot(self, ref: Reference, key: tuple[str, str], vecs: Tensor) -> dict:
        """Sinkhorn ratio of ``vecs`` at a (hook, class); the natural-vs-natural baseline (halves
        split by image) is cached on the reference per sample size."""
        nat = ref.natural(*key)
        base = {"hook": key[0], "class": key[1], "distance": float("nan"),
                "baseline": float("nan"), "ratio": float("nan"), "n": vecs.shape[0],
                "n_natural": 0, "n_images_natural": 0}
        if vecs.shape[0] < MIN_OT:  # a distance between a handful of points says nothing
            return {**base, "note": f"{vecs.shape[0]} patched vectors; the Sinkhorn ratio "
                                    f"needs at least {MIN_OT}"}
        try:
            r = ot_divergence(vecs, nat, groups=ref.images_of(*key),
                              max_samples=self.ot_samples, stats=ref.stats[key[0]][key[1]],
                              baseline_cache=ref._ot_baselines, cache_key=key)
        except InputError as e:
            return {**base, "n": 0, "note": str(e)}
        return {**base, "distance": r.distance, "baseline": r.baseline, "ratio": r.ratio,
                "n": r.n_patched, "n_natural": r.n_natural, "n_images_natural": r.n_images}


__all__ = ["MAX_JACOBIAN_OUTPUTS", "Collector", "first_downstream_mlp"]
