"""What happens at a site: interchange, zero, mean, resample, noise, add, scale or a callable.

An intervention sees the selected part of an activation, gathered to ``[E, B, T, (H), ...]``
(E variants sharing the intervention, B target images, T selected tokens, H selected heads)
and returns new values of the same shape. Interventions that need another input's activations
(`Interchange`, `Mean`, `Resample`) name that input in ``reference``; the engine runs it once,
caches only the hooks it needs, and hands the result to `prepare`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from patchlens.checks import check_int, check_number
from patchlens.errors import InputError
from patchlens.model.hooks import HookSpec


@dataclass
class Gather:
    """Index tensors that pick the selected activations of E entries out of a hook's tensor.

    ``rows`` ``[E, B]`` are rows of the running batch; ``images`` ``[E, B]`` the target image
    each row patches (used to pick aligned rows of a source); ``variants`` ``[E, B]`` the
    index of each row's variant in the whole sweep; ``selections`` one ``(axis, index [E, k])``
    per hook axis 1, 2, ... up to the last selected one (tokens, heads or features, in the
    hook's own axis order; empty for hooks without such axes: whole rows). A per-image token
    selection is ``[E, B, k]`` (each image its own tokens, padded to the largest count) with
    ``token_valid [E, B, k]`` marking real entries: padded entries are gathered (repeating a
    real index) but never written back. ``spec`` is the hook's `HookSpec`. The gathered
    tensor is ``[E, B, k_1, k_2, ..., *remaining axes]``.
    ``live`` holds, for an intervention with `Intervention.reads`, the activations of the
    running chunk at those hooks (``{hook: [rows, ...]}``, filled as the forward pass reaches
    them).
    """

    rows: Tensor
    images: Tensor
    variants: Tensor
    selections: tuple[tuple[int, Tensor], ...]
    spec: HookSpec
    token_valid: Tensor | None = None
    live: dict[str, Tensor] | None = None

    @property
    def hook(self) -> str:
        return self.spec.name

    def selected(self, axis: int | None) -> Tensor | None:
        """The index ``[E, k]`` on hook axis ``axis`` (None if that axis is not indexed)."""
        for a, sel in self.selections:
            if a == axis:
                return sel
        return None

    @property
    def tokens(self) -> Tensor | None:
        return self.selected(self.spec.token_axis)

    @property
    def heads(self) -> Tensor | None:
        return self.selected(self.spec.head_axis)

    @property
    def features(self) -> Tensor | None:
        return self.selected(self.spec.feature_axis)

    def index(self, batch: Tensor) -> tuple[Tensor, ...]:
        """An advanced index giving ``[E, B, k_1, ...]`` for batch indices ``batch [E, B]``."""
        e, b = batch.shape
        m = len(self.selections)
        out = [batch.view(e, b, *([1] * m))]
        for j, (_, sel) in enumerate(self.selections):
            shape = [e, 1] + [1] * m
            if sel.ndim == 3:  # per image
                shape[1] = b
            shape[2 + j] = sel.shape[-1]
            out.append(sel.view(shape))
        return tuple(out)

    def written(self, selected: Tensor) -> Tensor | None:
        """``[E, B, k_1, ..., k_m]`` True where a gathered entry is real (None: all are)."""
        if self.token_valid is None:
            return None
        m = len(self.selections)
        j = [a for a, _ in self.selections].index(self.spec.token_axis)
        e, b, k = self.token_valid.shape
        shape = [e, b] + [1] * m
        shape[2 + j] = k
        return self.token_valid.view(shape).expand(selected.shape[: 2 + m])

    def take(self, act: Tensor) -> Tensor:
        return act[self.index(self.rows)]

    def take_source(self, source: Tensor, batch: Tensor | None = None) -> Tensor:
        """Gather from a source activation whose batch axis is the target images (or size 1)."""
        if batch is None:
            batch = self.images if source.shape[0] > 1 else torch.zeros_like(self.images)
        return source[self.index(batch.to(source.device))]

    def to(self, device) -> Gather:
        return Gather(self.rows.to(device), self.images.to(device), self.variants.to(device),
                      tuple((a, t.to(device)) for a, t in self.selections), self.spec,
                      None if self.token_valid is None else self.token_valid.to(device),
                      self.live)


class Intervention:
    """Base class. Subclasses implement `values` (and `prepare` if they use ``reference``).

    ``reads`` names hooks of the *same* patched run whose activations `values` needs (an
    intervention that is a function of upstream activations, e.g. edge ablations in
    `patchlens.circuits`): the engine keeps them while each chunk runs and hands them over as
    ``where.live[hook]`` ``[rows, ...]`` (after any patching at that hook; the unpatched values
    for hooks before the chunk's start layer). At a patched hook, ``where.live`` holds the read
    hooks that have fired so far in the forward pass (those earlier in the hook schema's order).
    """

    reference: Tensor | None = None
    reads: tuple[str, ...] = ()

    def prepare(self, acts: dict[str, Tensor], target_batch: int,
                specs: dict[str, HookSpec]) -> dict[str, Tensor]:
        """Turn the reference input's cached activations ``{hook: [n, ...]}`` into what
        `values` reads; ``specs`` gives each hook's axes."""
        return acts

    def values(self, act: Tensor, where: Gather, source: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_source_batch(acts: dict[str, Tensor], target_batch: int, what: str) -> None:
    """A source's activations must hold one image, or one per target image."""
    for a in acts.values():
        if a.shape[0] not in (1, target_batch):
            raise InputError(
                f"{what} source has batch {a.shape[0]} but the target has {target_batch}; "
                "pass one source image or one per target image."
            )


class Interchange(Intervention):
    """Replace the activation by the same site's activation on ``source`` (interchange /
    activation patching). ``source`` is a batch of normalised images aligned with the target
    batch (or a single image used for every target)."""

    def __init__(self, source: Tensor, name: str = "source"):
        self.reference = _images(source, "Interchange source")
        self.name = name

    def prepare(self, acts, target_batch, specs):
        check_source_batch(acts, target_batch, "Interchange")
        return acts

    def values(self, act, where, source):
        return where.take_source(source).to(act.dtype)

    def __repr__(self) -> str:
        return f"Interchange({self.name})"


class Stored(Intervention):
    """Replace by activations the caller already has, ``acts[hook]`` ``[B or 1, ...]`` (batch
    aligned with the target batch): an `Interchange` whose source run was done outside the
    engine (e.g. batched with other work), so the engine runs no reference pass."""

    def __init__(self, acts: dict[str, Tensor], name: str = "stored"):
        self.acts, self.name = dict(acts), name

    def values(self, act, where, source):
        a = self.acts.get(where.hook)
        if a is None:
            raise InputError(f"{self!r} holds no activation for {where.hook}; it holds "
                             f"{', '.join(sorted(self.acts))}.")
        return where.take_source(a).to(act.dtype)

    def __repr__(self) -> str:
        return f"Stored({self.name})"


class Zero(Intervention):
    """Set the activation to zero (zero-ablation)."""

    def values(self, act, where, source):
        return torch.zeros_like(act)


class Mean(Intervention):
    """Replace by the mean activation over a reference set of images: per token position
    (``per_token=True``) or pooled over all tokens (``per_token=False``)."""

    def __init__(self, reference: Tensor, per_token: bool = True):
        self.reference = _images(reference, "Mean reference")
        if reference.shape[0] == 0:
            raise InputError("Mean needs at least one reference image.")
        self.per_token = per_token

    def prepare(self, acts, target_batch, specs):
        out = {}
        for hook, a in acts.items():
            m = a.mean(dim=0, keepdim=True)
            tok = specs[hook].token_axis
            if not self.per_token and tok is not None:
                m = m.mean(dim=tok, keepdim=True).expand_as(m)
            out[hook] = m
        return out

    def values(self, act, where, source):
        return where.take_source(source).to(act.dtype)

    def __repr__(self) -> str:
        return f"Mean(n={self.reference.shape[0]}, per_token={self.per_token})"


class Resample(Intervention):
    """Replace by the activation of a randomly drawn reference image (resample-ablation),
    one draw per target row, reproducible with ``seed``."""

    def __init__(self, reference: Tensor, seed: int = 0):
        self.reference = _images(reference, "Resample reference")
        if reference.shape[0] == 0:
            raise InputError("Resample needs at least one reference image.")
        self.seed = check_int(f"{type(self).__name__} seed", seed)

    def values(self, act, where, source):
        g = torch.Generator().manual_seed(self.seed)
        draws = torch.randint(0, source.shape[0], tuple(where.rows.shape), generator=g)
        return where.take_source(source, batch=draws).to(act.dtype)

    def __repr__(self) -> str:
        return f"Resample(n={self.reference.shape[0]}, seed={self.seed})"


class Noise(Intervention):
    """Add Gaussian noise of standard deviation ``std`` (seeded)."""

    def __init__(self, std: float, seed: int = 0):
        self.std = check_number("Noise std", std, 0.0)
        self.seed = check_int(f"{type(self).__name__} seed", seed)

    def values(self, act, where, source):
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(act.shape, generator=g, dtype=torch.float32).to(act.device, act.dtype)
        return act + self.std * noise

    def __repr__(self) -> str:
        return f"Noise(std={self.std})"


class Add(Intervention):
    """Add ``scale * direction`` (steering); ``direction`` broadcasts against the activation's
    last axes (e.g. ``[d_model]``)."""

    def __init__(self, direction: Tensor, scale: float = 1.0):
        try:
            direction = torch.as_tensor(direction)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"Add takes a direction tensor [..., d], got {direction!r}.") from None
        if not (direction.is_floating_point() and direction.ndim >= 1):
            raise InputError(f"The steering direction must be a float tensor [..., d], got "
                             f"dtype {direction.dtype} shape {tuple(direction.shape)}.")
        if not torch.isfinite(direction).all():
            raise InputError("The steering direction contains NaN or infinite values.")
        self.direction, self.scale = direction, check_number("Add scale", scale)

    def values(self, act, where, source):
        d = self.direction.to(act.device, act.dtype)
        if d.shape[-1] != act.shape[-1]:
            raise InputError(
                f"Add direction has shape {tuple(d.shape)}; the activation's last axis is {act.shape[-1]}."
            )
        return act + self.scale * d

    def __repr__(self) -> str:
        return f"Add(shape={tuple(self.direction.shape)}, scale={self.scale})"


class Scale(Intervention):
    """Multiply the activation by ``alpha``."""

    def __init__(self, alpha: float):
        self.alpha = check_number("Scale alpha", alpha)

    def values(self, act, where, source):
        return act * self.alpha

    def __repr__(self) -> str:
        return f"Scale({self.alpha})"


class Custom(Intervention):
    """Wrap a user function ``fn(activation, hook, site) -> activation``. The function gets
    the selected part of one variant's activation, ``[B, ...]`` in the hook's own axis order
    (B target images; the token, head or feature axes hold only the selected indices, e.g.
    ``[B, T, H, d_head]`` at ``hook_z``, ``[B, H, T, key_pos]`` at ``hook_pattern``), and must
    return a tensor of the same shape. With a per-image token selection it is called once per
    image, ``[1, T_i, ...]`` with that image's tokens.

    With ``source=`` images (one per target image, or one for all) the function also gets the
    same selection of the source's activation: ``fn(activation, hook, site, source_activation)``
    (the engine runs the source once, like `Interchange`), e.g. a blend
    ``lambda a, hook, site, src: 0.5 * a + 0.5 * src``."""

    def __init__(self, fn: Callable[..., Tensor], site: Any = None, *,
                 source: Tensor | None = None):
        _check_custom_signature(fn, 3 if source is None else 4)
        self.fn, self.site = fn, site
        self.reference = source

    def prepare(self, acts, target_batch, specs):
        return Interchange.prepare(self, acts, target_batch, specs)

    def values(self, act, where, source):
        raise RuntimeError("Custom interventions are applied per variant by the engine.")

    def apply_one(self, act: Tensor, hook, site, source: Tensor | None = None) -> Tensor:
        args = (act.clone(), hook, site) if self.reference is None else \
            (act.clone(), hook, site, source)
        out = self.fn(*args)
        if not isinstance(out, Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(
                f"The custom intervention {getattr(self.fn, '__name__', self.fn)!r} returned {got}; "
                f"it must return a tensor of the shape it was given, {tuple(act.shape)}."
            )
        return out

    def __repr__(self) -> str:
        src = "" if self.reference is None else ", source"
        return f"Custom({getattr(self.fn, '__name__', 'fn')}{src})"


class PerVariant(Intervention):
    """Set the activation to values given per variant: ``values [V, B, ...]`` holds, for each
    of the sweep's V variants and B target images, the full activation at the hook (the
    selection is taken from it). Used by path patching to replay captured receiver inputs."""

    def __init__(self, values: dict[str, Tensor]):
        self.by_hook = values

    def values(self, act, where, source):
        full = self.by_hook[where.hook]
        flat = full.reshape(-1, *full.shape[2:])  # [V * B, ...]
        b = full.shape[1]
        return flat[where.index(where.variants * b + where.images)].to(act.dtype)

    def __repr__(self) -> str:
        return f"PerVariant({', '.join(self.by_hook)})"


def _images(x: Any, what: str) -> Tensor:
    """A reference batch must be an image tensor ``[n, C, H, W]`` (checked against the model
    when the engine runs it)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{what} must be a batch of normalised images [n, C, H, W] "
                         f"(model.preprocess), got {got}; add a batch axis with x[None].")
    return x


def as_intervention(obj: Any) -> Intervention:
    """An `Intervention`, or a callable ``fn(activation, hook, site)`` wrapped in `Custom`."""
    if isinstance(obj, Intervention):
        return obj
    if callable(obj):
        _check_custom_signature(obj)
        return Custom(obj)
    raise InputError(f"{obj!r} is neither an Intervention nor a callable (activation, hook, site).")


def _check_custom_signature(fn: Callable, n: int = 3) -> None:
    """Refuse a TransformerLens-style two-argument hook ``fn(activation, hook)`` up front (and
    a function that cannot take the source activation when ``n=4``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if n == 4 and (len(positional) < 4 or len(required) > 4):
        name = getattr(fn, "__name__", repr(fn))
        raise InputError(
            f"Custom(..., source=...) calls {name!r} as fn(activation, hook, site, "
            f"source_activation); it takes {len(positional)} positional argument(s).")
    if len(positional) < 3 or (n == 3 and len(required) > 3):
        name = getattr(fn, "__name__", repr(fn))
        raise InputError(
            f"The intervention {name!r} takes {len(positional)} positional argument(s); patchlens "
            "calls interventions as fn(activation, hook, site), where activation is only the "
            "selected part ([B, ...], selected tokens/heads). To reuse a TransformerLens hook "
            "fn(activation, hook), wrap it: lambda act, hook, site: tl_hook(act, hook) (it then "
            "sees the selection, not the full activation), or run it with model.run_with_hooks."
        )
