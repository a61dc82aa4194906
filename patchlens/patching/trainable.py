"""Trainable interventions: interchange a learned subspace between a base and a source input.

Distributed alignment search (DAS; Geiger, Wu, Potts, Icard & Goodman 2023, arXiv 2303.02536)
learns an orthogonal rotation ``R`` of a site's vectors such that interchanging the first ``k``
rotated coordinates between a base and a source input interchanges a causal variable::

    h' = R^T ((1 - M) * R h_base + M * R h_source)        M = (1, ..., 1, 0, ..., 0)  (k ones)

Boundless DAS (Wu, Geiger, Icard, Potts & Goodman 2023, arXiv 2305.08809) learns ``M`` too: a
soft boundary ``m_i = sigmoid((w - i - 1/2) / T)`` whose width ``w`` is trained and whose
temperature ``T`` is annealed towards a hard mask.

These are ordinary engine interventions (`Intervention`) and `torch.nn.Module`s at once: they act
on the last axis of the selected activation (``d_model`` at residual hooks, ``d_head`` per head at
``z``/``q``/``k``/``v``), with the same rotation at every selected token and head, and they read
the source the way `Interchange` does: source images in ``reference`` (the engine runs them once)
or activations the caller already holds (``{hook: [B or 1, ...]}``, no source run). Parameters
are created by `build` (from the site's width; `patchlens.das.train_intervention` does it) with a
seeded initialisation; `with_source` returns a view that shares them. `save` / `load_intervention`
write and read one safetensors file (parameters, configuration and the trained site).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchlens.errors import InputError
from patchlens.patching.interventions import Gather, Intervention, check_source_batch
from patchlens.patching.sites import Rect, Site

FILE_KEY = "patchlens_intervention"


class _Orthonormal(nn.Module):
    """A ``[rows, cols]`` matrix with orthonormal columns (``rows >= cols``), learned with
    torch's orthogonal parametrization (matrix exponential when square, Householder otherwise;
    dynamic trivialization), initialised to a seeded random orthonormal matrix."""

    def __init__(self, rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype))
        nn.utils.parametrizations.orthogonal(self, "weight")
        q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # completion draws from torch's RNG
            self.weight = q.to(dtype)

    def forward(self) -> Tensor:
        return self.weight


class TrainableIntervention(nn.Module, Intervention):
    """Base class: a learned interchange between the base (the run being patched) and a source.

    Args:
        d_subspace: dimension ``k`` of the interchanged subspace.
        width: the site's vector width (last axis); None builds the parameters later (`build`).
        source: source images ``[B or 1, C, H, W]`` (the engine runs them, as for
            `Interchange`), or their activations ``{hook: [B or 1, ...]}``; None: give it later
            with `with_source`.
        seed: seed of the initialisation.
        dtype: dtype of the parameters (default: torch's default dtype); build in float64 for
            a float64 model (a float32 rotation cast to float64 is orthogonal to 1e-7 only).
    """

    def __init__(self, d_subspace: int, width: int | None = None, *, source: Any = None,
                 seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(d_subspace, bool) or not isinstance(d_subspace, int) or d_subspace < 1:
            raise InputError(f"d_subspace must be an int >= 1, got {d_subspace!r}.")
        self.d_subspace, self.seed = d_subspace, int(seed)
        self.dtype = dtype or torch.get_default_dtype()
        self.width: int | None = None
        self.site: Site | None = None   # the site it was trained for (set by training / load)
        self.meta: dict[str, Any] = {}  # what training recorded (IIA, model fingerprint, ...)
        self._set_source(source)
        if width is not None:
            self.build(width)

    # ---- parameters ---------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.width is not None

    def build(self, width: int, dtype: torch.dtype | None = None) -> TrainableIntervention:
        """Create the parameters for vectors of ``width`` (seeded; in ``dtype``, default the
        one given at construction; a no-op if already built for that width)."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"width must be an int >= 1, got {width!r}.")
        if self.built:
            if width != self.width:
                raise InputError(f"{self!r} was built for vectors of width {self.width}; this site "
                                 f"has width {width}. Build a new intervention for it.")
            return self
        if self.d_subspace > width:
            raise InputError(f"The subspace ({self.d_subspace} dimensions) is wider than the site, "
                             f"whose vectors have {width}; pick d_subspace <= {width}.")
        self.dtype = dtype or self.dtype
        self._build(width, torch.Generator().manual_seed(self.seed))
        self.width = width
        return self

    def _build(self, width: int, generator: torch.Generator) -> None:
        raise NotImplementedError

    # ---- the source ---------------------------------------------------------------------------
    def _set_source(self, source: Any) -> None:
        self.reference: Tensor | None = None
        self.stored: dict[str, Tensor] | None = None
        if source is None:
            return
        if isinstance(source, dict):
            bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
            if bad or not source:
                raise InputError("A stored source is a non-empty dict {hook name: activation "
                                 f"[B or 1, ...]}}; got keys {list(source)[:5]}.")
            self.stored = dict(source)
        elif isinstance(source, Tensor):
            self.reference = source
        else:
            raise InputError(f"source must be images [B, C, H, W] or {{hook: activations}}, got "
                             f"{type(source).__name__}.")

    def with_source(self, source: Any) -> TrainableIntervention:
        """The same intervention (parameters shared, not copied) reading ``source``: images
        ``[B or 1, C, H, W]`` or activations ``{hook: [B or 1, ...]}``."""
        if not self.built:
            raise InputError(f"{self!r} has no parameters yet: train it "
                             "(patchlens.das.train_intervention) or call .build(width) first.")
        view = copy.copy(self)
        view._set_source(source)
        return view

    def prepare(self, acts, target_batch, specs):
        check_source_batch(acts, target_batch, type(self).__name__)
        return acts

    def values(self, act: Tensor, where: Gather, source: Tensor | None) -> Tensor:
        if not self.built:
            raise InputError(f"{self!r} has no parameters yet: train it "
                             "(patchlens.das.train_intervention) or call .build(width) first.")
        if where.spec.has_key_axis:
            raise InputError(f"{self!r} rotates vectors; {where.hook} holds attention scores or "
                             "patterns (a key axis). Use it at a residual, attention-output or "
                             "per-head q/k/v/z hook.")
        if act.shape[-1] != self.width:
            raise InputError(f"{self!r} acts on vectors of width {self.width}, but the selection at "
                             f"{where.hook} has last axis {act.shape[-1]} (shape {tuple(act.shape)}).")
        if self.stored is not None:
            source = self.stored.get(where.hook)
            if source is None:
                raise InputError(f"{self!r} holds source activations for {sorted(self.stored)}, "
                                 f"not for {where.hook}.")
        if source is None:
            raise InputError(f"{self!r} has no source: pass source= images (or activations), or "
                             "use .with_source(images).")
        return self.interchange(act, where.take_source(source).to(act.dtype))

    # ---- the map ------------------------------------------------------------------------------
    def interchange(self, base: Tensor, source: Tensor) -> Tensor:
        """``[..., width]`` base vectors with the learned subspace taken from ``source``."""
        raise NotImplementedError

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        return self.interchange(base, source)

    def basis(self) -> Tensor:
        """``[width, k]`` orthonormal basis of the interchanged subspace (detached)."""
        raise NotImplementedError

    def n_interchanged(self) -> int:
        """How many rotated dimensions are interchanged (``d_subspace``; for the boundless
        variant, those whose mask is above 1/2)."""
        return self.d_subspace

    def anneal(self, progress: float) -> None:
        """Called by training with the fraction of steps done (temperature schedules)."""

    def penalty(self) -> Tensor | float:
        """A term added to the training loss (the boundless variant's width)."""
        return 0.0

    # ---- description and files ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"d_subspace": self.d_subspace, "width": self.width, "seed": self.seed}

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "seed")
        src = ""
        if self.reference is not None:
            src = f", source=images[{self.reference.shape[0]}]"
        elif self.stored is not None:
            src = f", source=stored[{', '.join(self.stored)}]"
        return f"{type(self).__name__}({cfg}{src})"

    __str__ = __repr__

    def save(self, path: str | Path) -> None:
        """One safetensors file: the parameters, the configuration, the site (if set) and
        ``meta``. Read it with `load_intervention` (or `patchlens.das.load`)."""
        from safetensors.torch import save_file

        if not self.built:
            raise InputError(f"{self!r} has no parameters to save; train or build it first.")
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        info = {"class": type(self).__name__, "config": self.config(),
                "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
                "site": None if self.site is None else site_to_json(self.site),
                "meta": self.meta}
        save_file(tensors, str(path), metadata={FILE_KEY: json.dumps(info)})


class RotatedSubspace(TrainableIntervention):
    """DAS (Geiger et al. 2023): a learned rotation ``R`` ``[width, width]`` (orthogonal);
    ``h' = R^T((1 - M) R h_base + M R h_source)`` with ``M`` the first ``d_subspace`` rotated
    dimensions."""

    def _build(self, width, generator):
        self.rotate = _Orthonormal(width, width, generator, self.dtype)

    @property
    def rotation(self) -> Tensor:
        """``R`` ``[width, width]``: rotated coordinates are ``R @ h``."""
        return self.rotate().T

    def mask(self, like: Tensor) -> Tensor:
        m = torch.zeros(self.width, dtype=like.dtype, device=like.device)
        m[: self.d_subspace] = 1
        return m

    def interchange(self, base, source):
        r = self.rotation.to(base.dtype)
        m = self.mask(base)
        mixed = (1 - m) * (base @ r.T) + m * (source @ r.T)
        return mixed @ r

    def basis(self) -> Tensor:
        return self.rotation[: self.n_interchanged()].T.detach()


class LowRankRotatedSubspace(TrainableIntervention):
    """DAS with only the ``d_subspace`` rows of the rotation that are interchanged: a learned
    ``Q`` ``[width, d_subspace]`` with orthonormal columns; ``h' = h_base + (h_source - h_base)
    Q Q^T`` (equal to `RotatedSubspace` with ``R[:k] = Q^T``; fewer parameters)."""

    def _build(self, width, generator):
        self.rotate = _Orthonormal(width, self.d_subspace, generator, self.dtype)

    def interchange(self, base, source):
        q = self.rotate().to(base.dtype)
        return base + ((source - base) @ q) @ q.T

    def basis(self) -> Tensor:
        return self.rotate().detach()


class BoundlessRotatedSubspace(TrainableIntervention):
    """Boundless DAS (Wu et al. 2023): a learned rotation and a learned soft boundary,
    ``h' = R^T((1 - m) R h_base + m R h_source)`` with ``m_i = sigmoid((w - i - 1/2) / T)``.

    Args:
        d_subspace: initial width ``w`` of the boundary (in rotated dimensions).
        temperature: ``(start, end)``: ``T`` goes geometrically from start to end over training
            (`anneal`); evaluation uses the current value.
        width_weight: weight of ``w / width`` in the training loss (`penalty`): without it the
            boundary grows to the whole space.
    """

    def __init__(self, d_subspace: int, width: int | None = None, *, source: Any = None,
                 seed: int = 0, dtype: torch.dtype | None = None,
                 temperature: tuple[float, float] = (50.0, 0.1), width_weight: float = 1.0):
        t0, t1 = (float(t) for t in temperature)
        if not (t0 > 0 and t1 > 0 and math.isfinite(t0) and math.isfinite(t1)):
            raise InputError(f"temperature must be two positive numbers (start, end), got {temperature!r}.")
        if not (width_weight >= 0 and math.isfinite(width_weight)):
            raise InputError(f"width_weight must be >= 0, got {width_weight!r}.")
        self.temperatures, self.width_weight = (t0, t1), float(width_weight)
        super().__init__(d_subspace, width, source=source, seed=seed, dtype=dtype)

    def _build(self, width, generator):
        self.rotate = _Orthonormal(width, width, generator, self.dtype)
        frac = min(max(self.d_subspace / width, 0.5 / width), 1 - 0.5 / width)
        self.boundary = nn.Parameter(torch.tensor(math.log(frac / (1 - frac)), dtype=self.dtype))
        self.register_buffer("temperature", torch.tensor(self.temperatures[0], dtype=self.dtype))

    @property
    def rotation(self) -> Tensor:
        return self.rotate().T

    def boundary_width(self) -> Tensor:
        """``w`` in rotated dimensions (between 0 and ``width``), differentiable."""
        return self.width * torch.sigmoid(self.boundary)

    def mask(self, like: Tensor) -> Tensor:
        i = torch.arange(self.width, dtype=like.dtype, device=like.device)
        w = self.boundary_width().to(like.dtype)
        return torch.sigmoid((w - i - 0.5) / self.temperature.to(like.dtype))

    def interchange(self, base, source):
        r = self.rotation.to(base.dtype)
        m = self.mask(base)
        return ((1 - m) * (base @ r.T) + m * (source @ r.T)) @ r

    def n_interchanged(self) -> int:
        return int((self.mask(self.boundary.detach()) > 0.5).sum())

    def basis(self) -> Tensor:
        return self.rotation[: self.n_interchanged()].T.detach()

    def anneal(self, progress: float) -> None:
        t0, t1 = self.temperatures
        p = min(max(float(progress), 0.0), 1.0)
        self.temperature.fill_(t0 * (t1 / t0) ** p)

    def penalty(self) -> Tensor:
        return self.width_weight * self.boundary_width() / self.width

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperature": list(self.temperatures),
                "width_weight": self.width_weight}


TRAINABLE: dict[str, type[TrainableIntervention]] = {
    c.__name__: c for c in (RotatedSubspace, LowRankRotatedSubspace, BoundlessRotatedSubspace)}


def read_info(path: str | Path) -> dict[str, Any]:
    """The JSON description stored in a file written by `TrainableIntervention.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise InputError(f"No intervention file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise InputError(f"{path} is not a safetensors file ({e}).") from None
    if FILE_KEY not in md:
        raise InputError(f"{path} is not a patchlens intervention file (no {FILE_KEY!r} metadata).")
    return json.loads(md[FILE_KEY])


def load_intervention(path: str | Path) -> TrainableIntervention:
    """Read a file written by `TrainableIntervention.save` (``.site`` and ``.meta`` restored)."""
    from safetensors.torch import load_file

    info = read_info(path)
    cls = TRAINABLE.get(info["class"])
    if cls is None:
        raise InputError(f"{path} holds a {info['class']!r}; known: {sorted(TRAINABLE)}.")
    cfg = dict(info["config"])
    width = cfg.pop("width")
    if "temperature" in cfg:
        cfg["temperature"] = tuple(cfg["temperature"])
    iv = cls(cfg.pop("d_subspace"), **cfg, dtype=getattr(torch, info.get("dtype", "float32")))
    iv.build(width)
    iv.load_state_dict(load_file(str(path)))
    iv.site = None if info.get("site") is None else site_from_json(info["site"])
    iv.meta = info.get("meta") or {}
    return iv


# ---- sites as JSON ----------------------------------------------------------------------------
def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float)):
        return v
    if isinstance(v, Rect):
        return {"rect": [v.r0, v.r1, v.c0, v.c1]}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, (list, range)):
        return [_encode(x) for x in v]
    if isinstance(v, Tensor):
        return {"bool_mask" if v.dtype == torch.bool else "index": v.tolist()}
    raise InputError(f"Cannot store {v!r} in a site description.")


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "rect" in v:
            return Rect(*v["rect"])
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
        if "bool_mask" in v:
            return torch.tensor(v["bool_mask"], dtype=torch.bool)
        if "index" in v:
            return torch.tensor(v["index"], dtype=torch.long)
    return v


def site_to_json(site: Site) -> dict[str, Any]:
    return {"hook": site.hook, "layers": _encode(site.layers), "tokens": _encode(site.tokens),
            "heads": _encode(site.heads), "features": _encode(site.features)}


def site_from_json(d: dict[str, Any]) -> Site:
    return Site(d["hook"], layers=_decode(d["layers"]), tokens=_decode(d["tokens"]),
                heads=_decode(d["heads"]), features=_decode(d["features"]))


__all__ = ["TrainableIntervention", "RotatedSubspace", "LowRankRotatedSubspace",
           "BoundlessRotatedSubspace", "TRAINABLE", "load_intervention", "read_info",
           "site_to_json", "site_from_json"]
