"""`Reference`: natural activations of a model at chosen sites, streamed and subsampled.

The natural distribution every divergence is measured against (Grant et al., "Divergent
representations", arXiv 2511.04638): per site and token class (``cls``, ``dist``,
``registers``, ``patches``, each kept apart; ``all`` for hooks without a token axis) a uniform
subsample of at most ``max_samples`` vectors with the image each came from, the exact
per-dimension mean and std over everything streamed, and, per layer, the natural range of every
MLP neuron (``blocks.{l}.mlp.hook_post``) for the dormant-pathway check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchlens.checks import check_int
from patchlens.errors import InputError, close_matches
from patchlens.model.hooks import OPTION_FLAGS, HookSpec

NEURON_SAMPLES = 1000  # reservoir per layer and class for neuron quantiles
RECOMMENDED_IMAGES = 2000  # see docs/divergence.md (calibration)


def fingerprint(model) -> dict[str, str]:
    """Config digest and a hash of a few weights: detects a reference fitted on another model."""
    cfg = model.cfg
    # the opt-in hook flags are run-time switches (model.options), not part of the model
    fields = {k: v for k, v in sorted(vars(cfg).items())
              if isinstance(v, (int, float, str, bool, tuple, list, type(None)))
              and k not in OPTION_FLAGS}
    h = hashlib.sha256()
    params = list(model.parameters())
    for p in params[:2] + params[len(params) // 2 : len(params) // 2 + 1] + params[-2:]:
        h.update(p.detach().flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
    return {"config": hashlib.sha256(repr(fields).encode()).hexdigest()[:16],
            "weights": h.hexdigest()[:16],
            "shape": f"{cfg.n_layers}x{cfg.d_model}x{cfg.d_mlp}"}


TOKEN_CLASSES = ("cls", "dist", "registers", "patches")


def token_classes(spec: HookSpec | None, prefix: Sequence[str],
                  n_tokens: int) -> dict[str, Tensor | None]:
    """Token indices of each class at a hook, from the layout's prefix names (``cls``,
    ``dist``, ``reg0``..; ``{"all": None}``: the hook has no token axis; ``spec`` None: a
    hook with a token axis)."""
    if spec is not None and spec.token_axis is None:
        return {"all": None}
    out: dict[str, list[int]] = {}
    for i, name in enumerate(prefix):
        out.setdefault("registers" if name.startswith("reg") else name, []).append(i)
    out["patches"] = list(range(len(prefix), n_tokens))
    return {c: torch.tensor(v) for c, v in out.items() if v}


def class_of_tokens(prefix: Sequence[str], tokens: Sequence[int]) -> list[str]:
    """The token class of each token index (see `token_classes`)."""
    n = len(prefix)
    return [("registers" if prefix[t].startswith("reg") else prefix[t]) if t < n else "patches"
            for t in tokens]


def vectors(act: Tensor, spec: HookSpec) -> Tensor:
    """A hook activation as ``[batch, tokens, D]`` (the token axis second, every other axis
    flattened into D; ``[batch, 1, D]`` for hooks without a token axis)."""
    if spec.has_key_axis:
        raise InputError(
            f"Divergence of attention scores or patterns ({spec.name}) is not supported; "
            "diagnose the attention output (attn_out, z or result) instead."
        )
    tok = spec.token_axis
    if tok is None:
        return act.reshape(act.shape[0], 1, -1)
    if tok != 1:
        act = act.movedim(tok, 1)
    return act.reshape(act.shape[0], act.shape[1], -1)


class _Reservoir:
    """Uniform sample without replacement of at most ``cap`` rows (priority sampling), with
    the image index of each row."""

    def __init__(self, cap: int, gen: torch.Generator):
        self.cap, self.gen = cap, gen
        self.keys: Tensor | None = None
        self.data: Tensor | None = None
        self.groups: Tensor | None = None

    def add(self, x: Tensor, groups: Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.gen)
        if self.data is None:
            self.keys, self.data, self.groups = keys, x.clone(), groups.clone()
        else:
            self.keys = torch.cat([self.keys, keys])
            self.data = torch.cat([self.data, x])
            self.groups = torch.cat([self.groups, groups])
        if self.data.shape[0] > self.cap:
            top = torch.topk(self.keys, self.cap).indices
            self.keys, self.data, self.groups = self.keys[top], self.data[top], self.groups[top]


class Reference:
    """Natural activations at a set of sites (see module docstring).

    Attributes:
        samples: ``{hook: {class: [n, D]}}`` subsampled natural vectors.
        groups: ``{hook: {class: [n]}}`` the image (index in the fitting stream) of each sample.
        stats: ``{hook: {class: (mean [D], std [D])}}`` over everything streamed.
        neurons: ``{layer: {class: {"max", "median", "q999"} [d_mlp]}}`` natural MLP ranges
            (max over everything streamed, quantiles over a subsample of `NEURON_SAMPLES`).
        meta: fingerprint, counts (vectors streamed per hook and class), layout.
    """

    VERSION = 2

    def __init__(self, samples, stats, neurons, meta, groups=None):
        self.samples: dict[str, dict[str, Tensor]] = samples
        self.stats: dict[str, dict[str, tuple[Tensor, Tensor]]] = stats
        self.neurons: dict[int, dict[str, dict[str, Tensor]]] = neurons
        self.meta: dict[str, Any] = meta
        self.groups: dict[str, dict[str, Tensor]] = groups or {
            h: {c: torch.arange(v.shape[0]) for c, v in d.items()} for h, d in samples.items()}
        self._scorers: dict = {}
        self._scorer_states: dict = {}   # (hook, cls, k, var) -> NaturalScorer.state_dict()
        self._ot_baselines: dict = {}    # in-memory cache of natural-vs-natural Sinkhorn

    # ---- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(cls, model, images_or_loader: Tensor | Iterable, sites: Sequence[Any] = ("resid_pre",),
            max_samples: int = 5000, batch_size: int = 64, progress: bool | None = None,
            seed: int = 0, scorers: bool = True) -> Reference:
        """Stream natural activations of ``model`` at ``sites``.

        Args:
            images_or_loader: normalised model inputs ``[N, C, H, W]`` (``model.preprocess``),
                or an iterable of such batches (or of tuples whose first item is one).
                Use at least `recommended_images` images (docs/divergence.md).
            sites: short names (``"resid_pre"``: every layer), ``(short_name, layers)``,
                `Site` objects or full hook names.
            max_samples: vectors kept per site and token class (uniform subsample).
            progress: tqdm bar (None: when there is more than one batch).
            scorers: also fit the per-vector tests of every site and class now (kept by
                `save`/`load`), so that diagnosing a sweep does not pay for it.
        """
        from patchlens.patching.sites import Site

        hooks: list[str] = []
        for s in sites:
            site = s if isinstance(s, Site) else Site(*s) if isinstance(s, tuple) else Site(s)
            hooks += [h for h, _ in site.hook_names(model)]
        hooks = list(dict.fromkeys(hooks))
        if not hooks:
            raise InputError("Reference.fit needs at least one site.")
        check_int("max_samples", max_samples, 1)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed)
        n_layers = model.cfg.n_layers
        mlp_hooks = {f"blocks.{l}.mlp.hook_post": l for l in range(n_layers)}
        mlp_hooks = {h: l for h, l in mlp_hooks.items() if h in model.hook_dict}
        layout = model.layout
        gen = torch.Generator().manual_seed(seed)

        p = next(model.parameters())
        if isinstance(images_or_loader, Tensor):
            x = images_or_loader  # cast batch by batch below, like a loader's batches
            model.check_images(x if x.dtype == p.dtype else x[:1].to(p.dtype))
            batches: Iterable = (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))
            total = -(-x.shape[0] // batch_size)
        else:
            batches, total = images_or_loader, None
            try:
                total = len(images_or_loader)  # type: ignore[arg-type]
            except TypeError:
                pass
        show = progress if progress is not None else (total is None or total > 1)
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=total, desc="reference", unit="batch", leave=False)

        res: dict[str, dict[str, _Reservoir]] = {}
        sums: dict[str, dict[str, list]] = {}
        nres: dict[int, dict[str, _Reservoir]] = {}
        nmax: dict[int, dict[str, Tensor]] = {}
        ncount: dict[str, dict[str, int]] = {}
        n_images = 0
        names = hooks + [h for h in mlp_hooks if h not in hooks]
        # opt-in hooks (e.g. the split inputs "q_input", "mlp_in") fire only with their flags
        with torch.inference_mode(), model.options(**model.options_for(names)):
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                if not isinstance(batch, (Tensor, np.ndarray)):
                    raise InputError(f"Reference.fit takes image tensors [n, C, H, W] or an "
                                     f"iterable of such batches; got a {type(batch).__name__}. "
                                     "Use model.preprocess(...) for images or paths.")
                batch = torch.as_tensor(batch).to(p.device, p.dtype)
                model.check_images(batch)
                _, cache = model.run_with_cache(batch, names_filter=names, return_type=None)
                img = torch.arange(n_images, n_images + batch.shape[0])
                n_images += batch.shape[0]
                for h in hooks:
                    spec = model.hook_spec(h)
                    v = vectors(cache[h], spec).float().cpu()
                    for c, toks in token_classes(spec, layout.prefix, v.shape[1]).items():
                        sel = v if toks is None else v[:, toks]
                        rows = sel.reshape(-1, v.shape[-1])
                        grp = img.repeat_interleave(sel.shape[1])
                        res.setdefault(h, {}).setdefault(c, _Reservoir(max_samples, gen)).add(rows, grp)
                        acc = sums.setdefault(h, {}).setdefault(c, [0, 0.0, 0.0])
                        r64 = rows.double()
                        acc[0] += rows.shape[0]
                        acc[1] = acc[1] + r64.sum(0)
                        acc[2] = acc[2] + (r64 * r64).sum(0)
                for h, l in mlp_hooks.items():
                    v = cache[h].float().cpu()
                    for c, toks in token_classes(model.hook_spec(h), layout.prefix,
                                                 v.shape[1]).items():
                        sel = v[:, toks]
                        rows = sel.reshape(-1, v.shape[-1])
                        grp = img.repeat_interleave(sel.shape[1])
                        nres.setdefault(l, {}).setdefault(c, _Reservoir(NEURON_SAMPLES, gen)).add(rows, grp)
                        m = rows.amax(0)
                        nc = ncount.setdefault(str(l), {})
                        nc[c] = nc.get(c, 0) + rows.shape[0]
                        d = nmax.setdefault(l, {})
                        d[c] = m if c not in d else torch.maximum(d[c], m)
        if n_images == 0:
            raise InputError("Reference.fit got no images.")

        samples = {h: {c: r.data for c, r in d.items()} for h, d in res.items()}
        groups = {h: {c: r.groups for c, r in d.items()} for h, d in res.items()}
        stats = {}
        for h, d in sums.items():
            stats[h] = {}
            for c, (n, s, s2) in d.items():
                mean = s / n
                var = (s2 / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
                stats[h][c] = (mean.float(), var.sqrt().float())
        neurons = {}
        for l, d in nres.items():
            neurons[l] = {}
            for c, r in d.items():
                q = torch.quantile(r.data, torch.tensor([0.5, 0.999]), dim=0)
                neurons[l][c] = {"max": nmax[l][c], "median": q[0], "q999": q[1]}
        meta = {"version": cls.VERSION, "fingerprint": fingerprint(model), "n_images": n_images,
                "max_samples": max_samples, "hooks": hooks, "prefix": list(layout.prefix),
                "n_prefix": layout.n_prefix, "n_tokens": layout.n_tokens, "seed": seed,
                "counts": {h: {c: int(v[0]) for c, v in d.items()} for h, d in sums.items()},
                "neuron_counts": ncount}
        ref = cls(samples, stats, neurons, meta, groups)
        if scorers:
            from threadpoolctl import threadpool_limits

            from patchlens.diagnostics.measures import few_threads

            # many small matrices: thread pools (torch's and BLAS's) cost more than they give
            with few_threads(1), threadpool_limits(1):
                for h, d in samples.items():
                    for c in d:
                        try:
                            ref.scorer(h, c)
                        except InputError:  # too few vectors: the verdict says so when asked
                            pass
        return ref

    # ---- access ---------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.samples)

    def check_model(self, model) -> None:
        """Raise `InputError` if the reference was fitted on another model."""
        mine, theirs = self.meta["fingerprint"], fingerprint(model)
        if mine != theirs:
            what = "architecture" if mine["config"] != theirs["config"] else "weights"
            raise InputError(
                f"This reference was fitted on another model ({what} differ: reference "
                f"{mine['shape']} {mine['weights']}, model {theirs['shape']} {theirs['weights']}). "
                "Fit a Reference on this model: Reference.fit(model, images, sites)."
            )

    def check_hook(self, hook: str) -> None:
        if hook not in self.samples:
            near = close_matches(hook, self.samples)
            hint = f" Closest: {', '.join(near)}." if near else ""
            raise InputError(
                f"Site {hook!r} is not in the reference (it has {len(self.samples)} sites).{hint} "
                f"Fit it: Reference.fit(model, images, sites=[..., {hook!r}])."
            )

    def natural(self, hook: str, cls: str) -> Tensor:
        """Natural vectors ``[n, D]`` at ``hook`` for token class ``cls``."""
        self.check_hook(hook)
        if cls not in self.samples[hook]:
            raise InputError(f"No {cls!r} tokens at {hook} in the reference; "
                             f"classes: {list(self.samples[hook])}.")
        return self.samples[hook][cls]

    def images_of(self, hook: str, cls: str) -> Tensor:
        """``[n]`` the image each natural vector of `natural` came from."""
        self.natural(hook, cls)
        return self.groups[hook][cls]

    def vectors_per_image(self, hook: str, cls: str) -> int:
        """Vectors of class ``cls`` one image contributes at ``hook`` (1 for the class token)."""
        return max(1, self.meta["counts"][hook][cls] // max(self.meta["n_images"], 1))

    def scorer(self, hook: str, cls: str, k: int = 20, var: float = 0.95):
        """The fitted per-vector test (`NaturalScorer`) of a site and token class (cached).
        Raises `InputError` if the class has too few natural vectors for it."""
        from patchlens.diagnostics.scorer import NaturalScorer

        key = (hook, cls, k, var)
        if key not in self._scorers:
            self._scorers[key] = NaturalScorer(
                self.natural(hook, cls), groups=self.groups[hook][cls], k=k, var=var,
                max_samples=self.meta["max_samples"], stats=self.stats[hook][cls],
                state=self._scorer_states.get(key) or None)
            self._scorer_states[key] = self._scorers[key].state_dict()
        return self._scorers[key]

    def __repr__(self) -> str:
        fp = self.meta["fingerprint"]
        return (f"Reference({len(self.samples)} sites, {self.meta['n_images']} images, "
                f"<= {self.meta['max_samples']} vectors per site and class, model "
                f"{fp['shape']} {fp['weights']})")

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {}
        for h, d in self.samples.items():
            for c, v in d.items():
                tensors[f"samples|{h}|{c}"] = v.contiguous()
                tensors[f"groups|{h}|{c}"] = self.groups[h][c].contiguous()
                tensors[f"mean|{h}|{c}"], tensors[f"std|{h}|{c}"] = self.stats[h][c]
        for l, d in self.neurons.items():
            for c, q in d.items():
                for k, v in q.items():
                    tensors[f"neurons|{l}|{c}|{k}"] = v.contiguous()
        for i, st in enumerate(self._scorer_states.values()):
            for name, v in st.items():
                tensors[f"scorer|{i}|{name}"] = v.contiguous()
        meta = {**self.meta, "scorers": [[h, c, k, var] for h, c, k, var in self._scorer_states]}
        save_file(tensors, str(path), metadata={"patchlens_reference": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a file written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if "patchlens_reference" not in md:
                raise InputError(f"{path} is not a patchlens Reference file.")
            meta = json.loads(md["patchlens_reference"])
            if meta.get("version", 1) != cls.VERSION:
                raise InputError(
                    f"{path} was written by an older patchlens (reference format "
                    f"{meta.get('version', 1)}, this one reads {cls.VERSION}); fit it again with "
                    "Reference.fit and save it.")
            samples: dict = {}
            groups: dict = {}
            stats: dict = {}
            neurons: dict = {}
            parts: dict = {}
            for key in f.keys():
                kind, *rest = key.split("|")
                t = f.get_tensor(key)
                if kind == "samples":
                    samples.setdefault(rest[0], {})[rest[1]] = t
                elif kind == "groups":
                    groups.setdefault(rest[0], {})[rest[1]] = t
                elif kind in ("mean", "std"):
                    parts.setdefault((rest[0], rest[1]), {})[kind] = t
                elif kind == "scorer":
                    parts.setdefault(("scorer", int(rest[0])), {})[rest[1]] = t
                elif kind == "neurons":
                    neurons.setdefault(int(rest[0]), {}).setdefault(rest[1], {})[rest[2]] = t
        keys = [tuple(k) for k in meta.pop("scorers", [])]
        states = {k: {} for k in keys}
        for (h, c), d in parts.items():
            if h == "scorer":
                states[keys[c]] = d
            else:
                stats.setdefault(h, {})[c] = (d["mean"], d["std"])
        samples = {h: samples[h] for h in meta["hooks"] if h in samples}
        ref = cls(samples, stats, dict(sorted(neurons.items())), meta, groups)
        ref._scorer_states = states
        return ref


__all__ = ["RECOMMENDED_IMAGES", "Reference", "TOKEN_CLASSES", "class_of_tokens", "fingerprint",
           "token_classes", "vectors"]
