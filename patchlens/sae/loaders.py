"""Loading sparse autoencoders from the formats people publish them in, read directly.

- **SAELens** (`load_saelens`): a folder with ``cfg.json`` and ``sae_weights.safetensors``
  (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, ``threshold`` for
  JumpReLU). Field names as SAELens 6 writes them (``architecture``, ``d_in``, ``d_sae``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k``,
  ``rescale_acts_by_decoder_norm``, ``metadata.hook_name``) and as SAELens < 6 wrote them
  (``hook_name`` / ``hook_point`` at the top level, ``activation_fn_str`` / ``activation_fn``
  with ``activation_fn_kwargs.k`` for TopK, boolean ``normalize_activations``, ``log_threshold``
  for JumpReLU). sae-lens itself pins transformer-lens < 4, so it is not imported.
- **ViT-Prisma** (`load_prisma`): a folder with ``config.json`` (its
  ``VisionModelSAERunnerConfig``: ``d_in``, ``expansion_factor``, ``hook_point_layer``,
  ``layer_subtype``, ``activation_fn_str``, ``activation_fn_kwargs``, ``normalize_activations``,
  ``architecture``) and ``weights.pt`` (a torch state dict, or ``{"cfg", "state_dict"}`` as its
  ``save_model`` writes). Its standard SAE always subtracts ``b_dec`` from the input; its
  ``normalize_activations`` default is ``"layer_norm"``.
- **A plain state dict** (`from_state_dict`): SAELens names, ``nn.Linear`` names
  (``encoder.weight [d_sae, d_in]``, ``decoder.weight [d_in, d_sae]``, ...), or OpenAI's
  (``pre_bias``, ``latent_bias``, ``encoder.weight``, ``decoder.weight``).

`patchlens.sae.sources.load` picks the format from what it is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.sae.sae import SAE

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
PRISMA_CFG = "config.json"


# ---- SAELens --------------------------------------------------------------------------------
def load_saelens(path: str | Path, dtype: torch.dtype | None = None, device: Any = None) -> SAE:
    """An SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise InputError(f"{path} is not a SAELens SAE folder: {p.name} is missing (it needs "
                             f"{SAELENS_CFG} and {SAELENS_WEIGHTS}).")
    cfg = json.loads(cfg_path.read_text())
    state = load_file(str(w_path))
    return saelens_from_dict(cfg, state, dtype=dtype, device=device, source=str(path))


def saelens_from_dict(cfg: dict, state: dict[str, Tensor], *, dtype=None, device=None,
                      source: str = "") -> SAE:
    """An SAE from a SAELens config dict and its weights (see `load_saelens`)."""
    cfg = dict(cfg)
    meta = dict(cfg.get("metadata") or {})
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    if not version or _version(version) < (6,):  # SAELens < 6 wrote everything at the top level
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                         ("activation_fn_str", "activation_fn")):
            if old in cfg and new not in cfg:
                cfg[new] = cfg[old]
        fn = cfg.get("activation_fn", "relu")
        if fn == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
            cfg.setdefault("architecture", "topk")
            cfg["architecture"] = "topk" if cfg["architecture"] == "standard" else cfg["architecture"]
            cfg["k"] = cfg["activation_fn_kwargs"]["k"]
        elif fn not in ("relu", None) and cfg.get("architecture", "standard") == "standard":
            raise InputError(f"SAELens activation_fn {fn!r} is not supported (relu, topk and "
                             "jumprelu are).")
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = ("expected_average_only_in"
                                            if cfg["normalize_activations"] else "none")
        for key in ("hook_name", "hook_head_index", "model_name"):
            if key in cfg and key not in meta:
                meta[key] = cfg[key]
    arch = cfg.get("architecture", "standard")
    kinds = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    if arch not in kinds:
        raise InputError(f"SAELens architecture {arch!r} is not supported; patchlens reads "
                         f"{', '.join(kinds)} SAEs.")
    if meta.get("hook_head_index") is not None:
        raise InputError("SAEs trained on one attention head (hook_head_index) are not supported; "
                         "patchlens splices SAEs over whole activations.")
    norm = cfg.get("normalize_activations") or "none"
    note = None
    if norm == "expected_average_only_in":
        # SAELens folds this scaling into the weights when it knows the factor (its pretrained
        # registry) and otherwise runs the SAE on the raw activations, as here.
        norm, note = "none", "normalize_activations='expected_average_only_in' read as 'none'"
    state = dict(state)
    if "scaling_factor" in state:
        if not torch.allclose(state["scaling_factor"], torch.ones_like(state["scaling_factor"])):
            raise InputError("This SAE has a fine-tuning scaling factor (SAELens < 6); fold it "
                             "into W_dec first (W_dec * scaling_factor[:, None]).")
        del state["scaling_factor"]
    if "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    kind = kinds[arch]
    sae = _build(state, kind, k=cfg.get("k") if kind == "topk" else None,
                 hook_name=meta.get("hook_name"),
                 apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                 normalize=norm,
                 rescale=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                 dtype=dtype, device=device,
                 meta={"format": "saelens", "source": source, "sae_lens_version": version,
                       "model_name": meta.get("model_name"),
                       "reshape_activations": cfg.get("reshape_activations", "none"),
                       **({"note": note} if note else {})})
    _check_size(sae, cfg)
    return sae


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(state, str(path / SAELENS_WEIGHTS))
    (path / SAELENS_CFG).write_text(json.dumps(sae.config(), indent=2))
    return path


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


# ---- ViT-Prisma -----------------------------------------------------------------------------
def load_prisma(path: str | Path, dtype: torch.dtype | None = None, device: Any = None) -> SAE:
    """An SAE from a ViT-Prisma checkpoint: a folder with ``config.json`` and a ``.pt`` weights
    file, or the ``.pt`` file itself (its ``config.json`` beside it, or a legacy file holding
    ``{"cfg", "state_dict"}``)."""
    path = Path(path)
    if path.is_dir():
        pts = sorted(path.glob("*.pt"))
        if not pts:
            raise InputError(f"{path} holds no .pt weights file (ViT-Prisma saves weights.pt).")
        w_path = path / "weights.pt" if (path / "weights.pt").exists() else pts[0]
    else:
        w_path = path
    if not w_path.exists():
        raise InputError(f"No such file: {w_path}.")
    loaded = _torch_load(w_path)
    cfg_path = w_path.parent / PRISMA_CFG
    if isinstance(loaded, dict) and "state_dict" in loaded and "cfg" in loaded:
        state, cfg = loaded["state_dict"], loaded["cfg"]
        cfg = vars(cfg) if not isinstance(cfg, dict) else cfg
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
    else:
        state = loaded
        if not cfg_path.exists():
            raise InputError(f"{w_path} holds weights only and {cfg_path} is missing; ViT-Prisma "
                             "keeps the config in config.json beside the weights.")
        cfg = json.loads(cfg_path.read_text())
    return prisma_from_dict(cfg, state, dtype=dtype, device=device, source=str(w_path))


def prisma_from_dict(cfg: dict, state: dict[str, Tensor], *, dtype=None, device=None,
                     source: str = "") -> SAE:
    """An SAE from a ViT-Prisma config dict and state dict (see `load_prisma`)."""
    if cfg.get("is_transcoder"):
        raise InputError("ViT-Prisma transcoders are not supported (only SAEs).")
    arch = cfg.get("architecture", "standard")
    if arch != "standard":
        raise InputError(f"ViT-Prisma architecture {arch!r} is not supported (standard is).")
    if cfg.get("hook_point_head_index") is not None:
        raise InputError("SAEs trained on one attention head (hook_point_head_index) are not "
                         "supported.")
    fn = cfg.get("activation_fn_str", "relu")
    if fn not in ("relu", "topk"):
        raise InputError(f"ViT-Prisma activation_fn_str {fn!r} is not supported (relu, topk).")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") if fn == "topk" else None
    if fn == "topk" and k is None:
        raise InputError("A ViT-Prisma TopK SAE needs activation_fn_kwargs.k in its config.")
    norm = cfg.get("normalize_activations", "layer_norm") or "none"
    if norm not in ("none", "layer_norm", "constant_norm_rescale"):
        raise InputError(f"ViT-Prisma normalize_activations {norm!r} is not supported.")
    hook = cfg.get("hook_point") or cfg.get("_custom_hook_point")
    if hook is None and cfg.get("hook_point_layer") is not None:
        layer = cfg["hook_point_layer"]
        layer = layer[0] if isinstance(layer, list) and len(layer) == 1 else layer
        hook = f"blocks.{layer}.{cfg.get('layer_subtype', 'ln2.hook_normalized')}"
    tokens = ("cls" if cfg.get("cls_token_only") else
              "patches" if cfg.get("use_patches_only") else "all")
    sae = _build(dict(state), "topk" if fn == "topk" else "relu", k=k, hook_name=hook,
                 apply_b_dec_to_input=True, normalize=norm, rescale=False, dtype=dtype,
                 device=device, meta={"format": "vit-prisma", "source": source,
                                      "model_name": cfg.get("model_name"),
                                      "trained_on_tokens": tokens})
    if cfg.get("d_in") is not None and cfg.get("expansion_factor") is not None:
        _check_size(sae, {"d_in": cfg["d_in"], "d_sae": cfg["d_in"] * cfg["expansion_factor"]})
    return sae


class _Stub:
    """Stands in for a class a checkpoint pickled (e.g. ViT-Prisma's config) so that
    ``torch.load(weights_only=True)`` can read its fields without importing that library."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; classes the file pickled by name (configs of other
    libraries) are read into plain stand-ins, never imported or run."""
    names: list[str] = []
    for _ in range(8):
        stubs = [(type(n.rsplit(".", 1)[-1], (_Stub,), {}), n) for n in names]
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError subclasses)
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if m is None or m.group(1) in names:
                raise InputError(f"Cannot read {path} as a torch checkpoint: {e}") from e
            names.append(m.group(1))
    raise InputError(f"Cannot read {path}: it pickles too many foreign classes ({names}).")


# ---- plain state dicts ----------------------------------------------------------------------
def from_state_dict(state: dict[str, Tensor], kind: str = "relu", k: int | None = None,
                    hook_name: str | None = None, *, apply_b_dec_to_input: bool | None = None,
                    normalize: str = "none", dtype: torch.dtype | None = None,
                    device: Any = None) -> SAE:
    """An SAE from a state dict in SAELens names (``W_enc [d_in, d_sae]``, ``b_enc``,
    ``W_dec [d_sae, d_in]``, ``b_dec``, ``threshold``), ``nn.Linear`` names
    (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``decoder.weight [d_in, d_sae]``,
    ``decoder.bias``) or OpenAI's (``pre_bias``: subtracted before encoding and added after
    decoding, ``latent_bias``, ``encoder.weight``, ``decoder.weight``). Shapes decide the
    orientation of ``W_enc`` / ``W_dec`` when they are given transposed.
    ``apply_b_dec_to_input`` (subtract ``b_dec`` before encoding) defaults to the layout's
    convention: True for SAELens and OpenAI names, False for ``nn.Linear`` names."""
    if not isinstance(state, dict) or not state:
        raise InputError("from_state_dict takes a non-empty dict of tensors.")
    s = dict(state)
    if "pre_bias" in s:  # OpenAI sparse_autoencoder: encoder(x - pre_bias) + latent_bias
        s = {"W_enc": s.pop("encoder.weight").T, "b_enc": s.pop("latent_bias"),
             "W_dec": s.pop("decoder.weight").T, "b_dec": s.pop("pre_bias"), **s}
        s.pop("stats_last_nonzero", None)
    elif "encoder.weight" in s:
        enc_b = s.pop("encoder.bias", None)
        w_enc, w_dec = s.pop("encoder.weight").T, s.pop("decoder.weight").T
        dec_b = s.pop("decoder.bias", None)
        s = {"W_enc": w_enc, "b_enc": enc_b if enc_b is not None else w_enc.new_zeros(w_enc.shape[1]),
             "W_dec": w_dec, "b_dec": dec_b if dec_b is not None else w_dec.new_zeros(w_dec.shape[1]),
             **s}
        if apply_b_dec_to_input is None:  # nn.Linear SAEs: encoder(x), no decoder bias first
            apply_b_dec_to_input = False
    if "log_threshold" in s:
        s["threshold"] = s.pop("log_threshold").exp()
    if apply_b_dec_to_input is None:
        apply_b_dec_to_input = True
    return _build(s, kind, k=k, hook_name=hook_name, apply_b_dec_to_input=apply_b_dec_to_input,
                  normalize=normalize, rescale=False, dtype=dtype, device=device,
                  meta={"format": "state_dict"})


def check_dtype(dtype: Any) -> None:
    """``dtype`` is None or a ``torch.dtype`` of floating point (the SAE's weights)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got "
                         f"{dtype!r}.")


def _build(state: dict[str, Tensor], kind: str, *, k, hook_name, apply_b_dec_to_input,
           normalize, rescale, dtype, device, meta) -> SAE:
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if kind == "jumprelu" else [])
    missing = [n for n in need if n not in state]
    if missing:
        raise InputError(f"The SAE weights lack {', '.join(missing)} (found "
                         f"{', '.join(sorted(state)) or 'nothing'}).")
    extra = sorted(set(state) - set(need))
    if extra:
        raise InputError(f"Unexpected SAE weights {extra} for a {kind} SAE (expected {need}).")
    w_enc, w_dec = state["W_enc"], state["W_dec"]
    if w_enc.ndim != 2 or w_dec.ndim != 2:
        raise InputError(f"W_enc and W_dec must be matrices, got {tuple(w_enc.shape)} and "
                         f"{tuple(w_dec.shape)}.")
    d_in, d_sae = state["b_dec"].shape[0], state["b_enc"].shape[0]
    if w_enc.shape == (d_sae, d_in) and d_sae != d_in:
        w_enc = w_enc.T
    if w_dec.shape == (d_in, d_sae) and d_sae != d_in:
        w_dec = w_dec.T
    if w_enc.shape != (d_in, d_sae) or w_dec.shape != (d_sae, d_in):
        raise InputError(f"SAE weight shapes do not fit: W_enc {tuple(state['W_enc'].shape)}, "
                         f"W_dec {tuple(state['W_dec'].shape)}, b_enc [{d_sae}], b_dec [{d_in}].")
    for name in need:
        if not torch.isfinite(state[name]).all():
            raise InputError(f"The SAE weight {name} contains NaN or infinite values.")
    check_dtype(dtype)
    dt = dtype or w_enc.dtype
    sae = SAE(d_in, d_sae, kind, k=k, hook_name=hook_name,
              apply_b_dec_to_input=apply_b_dec_to_input, normalize=normalize,
              rescale_acts_by_decoder_norm=rescale, dtype=dt, device=device, meta=meta)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.copy_(state["b_enc"])
        sae.b_dec.copy_(state["b_dec"])
        if kind == "jumprelu":
            if state["threshold"].shape != (d_sae,):
                raise InputError(f"threshold must be [{d_sae}], got "
                                 f"{tuple(state['threshold'].shape)}.")
            sae.threshold.copy_(state["threshold"])
    return sae.eval()


def _check_size(sae: SAE, cfg: dict) -> None:
    for key in ("d_in", "d_sae"):
        if cfg.get(key) is not None and int(cfg[key]) != getattr(sae, key):
            raise InputError(f"The config says {key}={cfg[key]} but the weights have "
                             f"{key}={getattr(sae, key)}.")


__all__ = ["load_saelens", "save_saelens", "saelens_from_dict", "load_prisma",
           "prisma_from_dict", "from_state_dict"]
