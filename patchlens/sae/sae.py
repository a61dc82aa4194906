"""The sparse-autoencoder protocol and patchlens's own SAE module (ReLU, TopK, JumpReLU).

An SAE maps an activation ``x [..., d_in]`` to sparse feature activations ``f [..., d_sae]`` and
back to a reconstruction ``x_hat = f W_dec + b_dec``:

- ReLU (Bricken et al. 2023, "Towards monosemanticity"): ``f = ReLU((x - b_dec) W_enc + b_enc)``.
- TopK (Gao et al. 2024, arXiv 2406.04093): keep the ``k`` largest pre-activations (then ReLU).
- JumpReLU (Rajamanoharan et al. 2024, arXiv 2407.14435): ``f = ReLU(pre) * [pre > theta]``,
  one threshold ``theta`` per feature.

Conventions follow SAELens (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``apply_b_dec_to_input``, ``normalize_activations``, ``rescale_acts_by_decoder_norm`` for TopK),
so its checkpoints load without conversion (`patchlens.sae.loaders`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from patchlens.errors import InputError

KINDS = ("relu", "topk", "jumprelu")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")


@runtime_checkable
class SAEProtocol(Protocol):
    """What `HookedViT.add_sae` and the feature tools need from a sparse autoencoder.

    ``encode(x [..., d_in]) -> [..., d_sae]``, ``decode(f [..., d_sae]) -> [..., d_in]``,
    ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``d_sae`` and ``hook_name`` (the hook it was
    trained on, or None). patchlens's `SAE` implements it, and so does any object with these
    attributes (e.g. a SAELens ``SAE`` whose ``hook_name`` attribute you set).
    """

    W_dec: Tensor
    b_dec: Tensor

    @property
    def d_sae(self) -> int: ...

    @property
    def hook_name(self) -> str | None: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, feature_acts: Tensor) -> Tensor: ...


class SAE(nn.Module):
    """A sparse autoencoder over one hook's activations.

    Args:
        d_in: width of the activation (``d_model`` for the residual stream).
        d_sae: number of features.
        kind: ``"relu"``, ``"topk"`` (needs ``k``) or ``"jumprelu"`` (per-feature ``threshold``).
        k: active features per vector for ``"topk"``.
        hook_name: the hook it reads (``"blocks.3.hook_resid_post"``), used by `add_sae`.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens's
            default, as in Bricken et al.).
        normalize: ``"none"``, or a per-vector input normalisation undone on the output:
            ``"layer_norm"`` (SAELens / ViT-Prisma: centre, divide by the unbiased std + 1e-5) or
            ``"constant_norm_rescale"`` (scale to norm ``sqrt(d_in)``).
        rescale_acts_by_decoder_norm: TopK only: rank ``pre * ||W_dec[f]||`` and decode with
            ``f / ||W_dec[f]||`` (SAELens's option of the same name).

    Parameters ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
    and, for JumpReLU, ``threshold [d_sae]``. ``meta`` holds anything else (training figures,
    source format).
    """

    def __init__(self, d_in: int, d_sae: int, kind: str = "relu", k: int | None = None,
                 hook_name: str | None = None, *, apply_b_dec_to_input: bool = True,
                 normalize: str = "none", rescale_acts_by_decoder_norm: bool = False,
                 dtype: torch.dtype = torch.float32, device: Any = None,
                 meta: dict | None = None):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}.")
        if kind == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
                raise InputError(f"A TopK SAE needs k, an int in 1..d_sae={d_sae}; got {k!r}.")
        elif k is not None:
            raise InputError(f"k is only used by kind='topk', not {kind!r}.")
        if normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {', '.join(NORMALIZATIONS)}; got "
                             f"{normalize!r}.")
        if rescale_acts_by_decoder_norm and kind != "topk":
            raise InputError("rescale_acts_by_decoder_norm is a TopK option.")
        self.kind, self.k, self.hook_name = kind, k, hook_name
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize = normalize
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.meta: dict = dict(meta or {})
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if kind == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))
        else:
            self.threshold = None

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.kind == "topk" else ""
        return (f"{self.kind}, d_in={self.d_in}, d_sae={self.d_sae}{k}, hook={self.hook_name!r}"
                + (f", normalize={self.normalize!r}" if self.normalize != "none" else ""))

    # ---- the pieces (the splice runs them one by one, with a hook point between each) -----
    def normalize_input(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Any]:
        """``(x_normalised, stats)``; ``stats`` undoes it in `decode` (None without
        normalisation)."""
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
            return xc / (std + 1e-5), ("layer_norm", mu, std)
        if self.normalize == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, ("constant_norm_rescale", coeff)
        return x, None

    def pre_acts(self, x_normalised: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder pre-activations of an (already normalised) input."""
        x = x_normalised - self.b_dec if self.apply_b_dec_to_input else x_normalised
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The activation function: ReLU, TopK (then ReLU) or JumpReLU."""
        if self.kind == "relu":
            return F.relu(pre)
        if self.kind == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        return F.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations ``[..., d_sae]``."""
        xn, _ = self.normalize_input(x)
        return self.activate(self.pre_acts(xn))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"],
               stats: Any = None) -> Float[Tensor, "... d_in"]:
        """Reconstruction ``f W_dec + b_dec`` (with ``stats`` from `normalize_input`: the input
        normalisation undone). An SAE with a per-vector normalisation needs ``stats``: decode
        the output of `forward`'s encode, or call ``sae(x)``."""
        f = feature_acts
        if self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        out = f @ self.W_dec + self.b_dec
        if self.normalize == "none":
            return out
        if stats is None:
            raise InputError(f"This SAE normalises its input per vector ({self.normalize!r}); "
                             "decode(acts, stats) needs the stats from normalize_input(x), or "
                             "call sae(x) for the reconstruction.")
        if stats[0] == "layer_norm":
            return out * stats[2] + stats[1]
        return out / stats[1]

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction of ``x``."""
        xn, stats = self.normalize_input(x)
        return self.decode(self.activate(self.pre_acts(xn)), stats)

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_(self, seed: int = 0, data: Tensor | None = None) -> SAE:
        """Initialise for training: ``W_dec`` random unit rows, ``W_enc = W_dec^T``, ``b_enc = 0``,
        ``b_dec`` the mean of ``data [n, d_in]`` if given (Bricken et al. 2023; Gao et al. 2024)."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_in, generator=g, dtype=torch.float64)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_(w.T.to(self.W_enc))
        self.b_enc.zero_()
        self.b_dec.copy_(data.mean(0).to(self.b_dec) if data is not None else 0)
        if self.threshold is not None:
            self.threshold.zero_()
        return self

    def config(self) -> dict[str, Any]:
        """The SAELens-style config of this SAE (see `patchlens.sae.loaders.save_saelens`)."""
        cfg = {"architecture": {"relu": "standard"}.get(self.kind, self.kind),
               "d_in": self.d_in, "d_sae": self.d_sae, "dtype": str(self.W_enc.dtype).split(".")[-1],
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize, "reshape_activations": "none",
               "metadata": {"hook_name": self.hook_name, "sae_lens_version": "6.0.0",
                            "model_name": self.meta.get("model_name")}}
        if self.kind == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return cfg


def d_sae_of(sae: Any) -> int:
    """Number of features of any `SAEProtocol` object."""
    d = getattr(sae, "d_sae", None)
    if d is None and getattr(sae, "cfg", None) is not None:
        d = getattr(sae.cfg, "d_sae", None)
    if d is None:
        d = sae.W_dec.shape[0]
    return int(d)


def hook_name_of(sae: Any) -> str | None:
    """The hook an SAE was trained on: ``sae.hook_name``, or SAELens's
    ``sae.cfg.metadata.hook_name`` / ``sae.cfg.hook_name``; None if it does not say."""
    name = getattr(sae, "hook_name", None)
    cfg = getattr(sae, "cfg", None)
    if name is None and cfg is not None:
        meta = getattr(cfg, "metadata", None)
        name = getattr(meta, "hook_name", None) if meta is not None else None
        name = name or getattr(cfg, "hook_name", None)
    return name


def check_sae(sae: Any) -> None:
    """Raise `InputError` unless ``sae`` implements `SAEProtocol` (encode, decode, W_dec,
    b_dec)."""
    missing = [a for a in ("encode", "decode", "W_dec", "b_dec") if not hasattr(sae, a)]
    if missing:
        raise InputError(
            f"{type(sae).__name__} is not a sparse autoencoder patchlens can use: it lacks "
            f"{', '.join(missing)}. Pass a patchlens.sae.SAE (see patchlens.sae.load) or an "
            "object with encode, decode, W_dec [d_sae, d_in] and b_dec [d_in]."
        )
    w = sae.W_dec
    if not isinstance(w, Tensor) or w.ndim != 2:
        raise InputError(f"W_dec must be a [d_sae, d_in] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}.")


__all__ = ["SAE", "SAEProtocol", "KINDS", "NORMALIZATIONS", "check_sae", "d_sae_of",
           "hook_name_of"]
