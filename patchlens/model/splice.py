"""Splicing a sparse autoencoder into a hook point (`HookedViT.add_sae`).

The hook point ``blocks.3.hook_resid_post`` is replaced by an `SAESplice`: the same hook point
(its hooks still see the activation the model produced), followed by the SAE with six hook
points of its own, named as SAELens names them and declared in the hook schema, in forward
order::

    blocks.3.hook_resid_post                          the model's activation (the SAE's input)
    blocks.3.hook_resid_post.hook_sae_input           [batch pos d_model]
    blocks.3.hook_resid_post.hook_sae_acts_pre        [batch pos feature]  encoder pre-activations
    blocks.3.hook_resid_post.hook_sae_acts_post       [batch pos feature]  feature activations
    blocks.3.hook_resid_post.hook_sae_recons          [batch pos d_model]  reconstruction
    blocks.3.hook_resid_post.hook_sae_error           [batch pos d_model]  input - clean reconstruction
    blocks.3.hook_resid_post.hook_sae_output          [batch pos d_model]  what the network reads on

With ``use_error_term=True`` the output is ``recons + error``, where the error is computed from
an unpatched reconstruction: unpatched, the output equals the input (to rounding), so a feature
intervention changes the output by exactly that feature's part of the reconstruction.
Differences from SAELens: ``hook_sae_recons`` holds the reconstruction in the activation's own
space and shape (after undoing any input normalisation and, for ``hook_z``, un-flattening the
heads), so ``output = recons + error`` always; the error keeps its autograd graph (gradients of
the spliced model with the error term equal the plain model's).

This module is part of `patchlens.model`: it knows only the SAE protocol (``encode``,
``decode``, ``W_dec``, ``b_dec``; optionally patchlens's ``normalize_input`` / ``pre_acts`` /
``activate`` / ``decode(acts, stats)``), not the `patchlens.sae` package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from patchlens.errors import InputError
from patchlens.model.components import is_hooked
from patchlens.model.hooks import FEATURE_AXIS, HookDecl, HookSpec, _layer_of, declare_hooks

#: the SAE hook points in forward order: local name -> (alias suffix, what it holds)
SAE_HOOKS = {
    "hook_sae_input": ("sae_input", "SAE input (the activation, after hooks at the parent)"),
    "hook_sae_acts_pre": ("sae_acts_pre", "SAE encoder pre-activations"),
    "hook_sae_acts_post": ("sae_acts_post", "SAE feature activations"),
    "hook_sae_recons": ("sae_recons", "SAE reconstruction (in the activation's space)"),
    "hook_sae_error": ("sae_error", "input - unpatched reconstruction (with use_error_term)"),
    "hook_sae_output": ("sae_output", "what the rest of the network reads"),
}
FEATURE_HOOKS = ("hook_sae_acts_pre", "hook_sae_acts_post")


class SAESplice(HookPoint):
    """A hook point followed by a sparse autoencoder (see the module docstring).

    The SAE is kept outside the module tree (``model.parameters()``, ``state_dict`` and
    ``model.to`` do not include it); it runs in its own dtype (inputs are cast to it and the
    outputs back).
    """

    #: tells the components' fast paths (`is_hooked`) to call this hook point
    transforms = True

    def __init__(self, sae: Any, spec: HookSpec, flatten: int, use_error_term: bool,
                 alias_prefix: str | None):
        super().__init__()
        self.__dict__["sae"] = sae
        self.use_error_term = bool(use_error_term)
        self.flatten = flatten
        self.parent_axes = spec.axes
        self.parent_opt_in = spec.opt_in
        self._declare(alias_prefix)
        self._parts = _parts(sae)

    def _declare(self, alias_prefix: str | None) -> None:
        lead = self.parent_axes[: len(self.parent_axes) - self.flatten]
        feat = " ".join((*lead, FEATURE_AXIS))
        full = " ".join(self.parent_axes)
        decls = {}
        for local, (alias, doc) in SAE_HOOKS.items():
            decls[local] = HookDecl(feat if local in FEATURE_HOOKS else full, doc,
                                    opt_in=self.parent_opt_in,
                                    alias=None if alias_prefix is None else alias_prefix + alias)
        if hasattr(self, "hook_decls"):  # re-aliasing an existing splice: keep its hook points
            self.hook_decls = decls
        else:
            declare_hooks(self, decls)

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        x = super().__call__(x)  # this hook point and its hooks: the model's activation
        return self.run_sae(x)

    def run_sae(self, x: Tensor) -> Tensor:
        p = self._parts
        x_in = self.hook_sae_input(x)
        flat = x_in.flatten(-2) if self.flatten == 2 else x_in
        w = self.sae.W_dec
        if w.device != flat.device:
            raise InputError(f"The SAE at {self.name} is on {w.device} but the activations are "
                             f"on {flat.device}; move it with sae.to({str(flat.device)!r}).")
        xs = flat.to(w.dtype)
        xn, stats = p.normalize(xs)
        pre_raw = p.pre(xn)
        internal = is_hooked(self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        clean = None
        if self.use_error_term and internal:  # the reconstruction no hook has touched
            clean = self._shape(p.decode(p.activate(pre_raw), stats), x_in)
        post = self.hook_sae_acts_post(p.activate(self.hook_sae_acts_pre(pre_raw)))
        raw = self._shape(p.decode(post, stats), x_in)
        recons = self.hook_sae_recons(raw)
        if not self.use_error_term:
            return self.hook_sae_output(recons)
        error = self.hook_sae_error(x_in - (raw if clean is None else clean))
        return self.hook_sae_output(recons + error)

    def _shape(self, y: Tensor, like: Tensor) -> Tensor:
        return y.to(like.dtype).reshape(like.shape)


class _Parts:
    """normalize / pre / activate / decode of an SAE, with fallbacks for protocol objects that
    only have ``encode`` and ``decode`` (their acts_pre hook then holds the activations)."""

    def __init__(self, sae: Any):
        self.sae = sae
        self.split = all(callable(getattr(sae, a, None))
                         for a in ("normalize_input", "pre_acts", "activate"))

    def normalize(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.sae.normalize_input(x) if self.split else (x, None)

    def pre(self, xn: Tensor) -> Tensor:
        return self.sae.pre_acts(xn) if self.split else self.sae.encode(xn)

    def activate(self, pre: Tensor) -> Tensor:
        return self.sae.activate(pre) if self.split else pre

    def decode(self, acts: Tensor, stats: Any) -> Tensor:
        return self.sae.decode(acts, stats) if self.split else self.sae.decode(acts)


def _parts(sae: Any) -> _Parts:
    return _Parts(sae)


# ---- splicing into a model -------------------------------------------------------------------
def widths(cfg) -> dict[str, int]:
    """Sizes of the named vector axes a splice can read."""
    return {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "d_head": cfg.d_head,
            "d_pooled": cfg.d_pooled,
            "embed_dim": (cfg.zeroshot or {}).get("embed_dim", -1)}


def flatten_for(model, spec: HookSpec, d_in: int) -> int:
    """How many trailing axes of hook ``spec`` the SAE reads (1, or 2 for ``head d_head``);
    raises `InputError` if the SAE's width fits neither."""
    if spec.has_key_axis or spec.name.endswith((".hook_scale",)):
        raise InputError(f"Cannot splice an SAE at {spec.describe()}: SAEs read vectors "
                         "(residual stream, attention or MLP outputs, hook_z, MLP neurons).")
    if FEATURE_AXIS in spec.axes or ".hook_sae_" in spec.name:
        raise InputError(f"{spec.name} is already an SAE's hook point; splice at the model's "
                         "own hook instead.")
    w = widths(model.cfg)
    last = spec.axes[-1]
    if w.get(last) == d_in:
        return 1
    if spec.axes[-2:] == ("head", "d_head") and model.cfg.n_heads * model.cfg.d_head == d_in:
        return 2
    have = f"{last}={w.get(last, '?')}"
    if spec.axes[-2:] == ("head", "d_head"):
        have += f" (or head x d_head = {model.cfg.n_heads * model.cfg.d_head})"
    raise InputError(f"The SAE reads vectors of width d_in={d_in}, but {spec.describe()} has "
                     f"{have}; was it trained on another hook or model?")


def splice(model, sae: Any, hook: str, use_error_term: bool) -> SAESplice:
    """Replace hook point ``hook`` of ``model`` by an `SAESplice` (model.setup() is the
    caller's)."""
    spec = model.hook_spec(hook)
    current = model.hook_dict[hook]
    if any(hp.fwd_hooks or hp.bwd_hooks for hp in current.modules() if isinstance(hp, HookPoint)):
        raise InputError(f"{hook} has hooks attached; remove them (model.reset_hooks()) before "
                         "splicing an SAE there.")
    d_in = int(sae.W_dec.shape[-1])
    flatten = flatten_for(model, spec, d_in)
    new = SAESplice(sae, spec, flatten, use_error_term, alias_prefix="")
    _set(model, hook, new)
    return new


def unsplice(model, hook: str) -> None:
    """Put a plain hook point back at ``hook``."""
    _set(model, hook, HookPoint())


def _set(model, path: str, module) -> None:
    parent_path, _, local = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[local] = module  # same position in the module order: forward order kept


def resume_point(model, hook: str) -> tuple[str, int] | None:
    """Where a run that changes only ``hook`` can start, if ``hook`` is one of the hook points
    of an SAE spliced at a block's output (``blocks.L.hook_resid_post.hook_sae_*``):
    ``(splice hook name, L + 1)``. Such a run needs only the SAE's input there (the activation
    at ``blocks.L.hook_resid_post``, which the change cannot affect) and `run_after_splice`,
    not block ``L``. None for any other hook."""
    parent, _, local = hook.rpartition(".")
    if local not in SAE_HOOKS or not isinstance(model.hook_dict.get(parent), SAESplice):
        return None
    layer = _layer_of(parent)
    if layer is None or parent != f"blocks.{layer}.hook_resid_post":
        return None
    return parent, layer + 1


def run_after_splice(model, hook: str, x: Tensor, **forward_kwargs: Any) -> Tensor | None:
    """Continue a forward pass from the input of the SAE spliced at ``hook``
    (``blocks.L.hook_resid_post``, see `resume_point`): ``x`` ``[batch, pos, d_model]`` is
    the activation at that hook point; the SAE runs (its hook points and their hooks fire),
    then blocks ``L + 1 ...`` and the head (``forward_kwargs`` go to the model's forward).
    Equals the full forward pass whose activation at ``hook`` is ``x``."""
    splice_ = model.hook_dict.get(hook)
    point = None if splice_ is None else resume_point(model, f"{hook}.hook_sae_output")
    if not isinstance(splice_, SAESplice) or point is None:
        raise InputError(f"{hook} is not a block's resid_post with an SAE spliced in; "
                         "run_after_splice resumes from such a splice only.")
    return model(splice_.run_sae(x), start_at_layer=point[1], **forward_kwargs)


def splices(model) -> dict[str, SAESplice]:
    """``{hook name: SAESplice}`` of every SAE spliced into ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SAESplice)}


def assign_aliases(model, by_hook: Mapping[str, SAESplice]) -> None:
    """Short names for the SAE hook points: ``sae_acts_post`` where one SAE is spliced in a
    layer (or outside the blocks), ``<parent alias>.sae_acts_post`` (e.g.
    ``resid_post.sae_acts_post``) for every SAE of a layer that has several."""
    per_layer: dict[Any, int] = {}
    for name in by_hook:
        per_layer[_layer_of(name)] = per_layer.get(_layer_of(name), 0) + 1
    for name, sp in by_hook.items():
        prefix = ""
        if per_layer[_layer_of(name)] > 1:
            parent_path, _, local = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            decl = getattr(parent, "hook_decls", {}).get(local)
            prefix = f"{(decl.alias if decl is not None else None) or local}."
        sp._declare(prefix)


__all__ = ["SAESplice", "SAE_HOOKS", "splice", "unsplice", "splices", "assign_aliases",
           "flatten_for", "resume_point", "run_after_splice"]
