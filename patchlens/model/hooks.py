"""The hook schema: what every hook point of a `HookedViT` holds.

Each component declares its hook points where it creates them, with `declare_hooks`::

    declare_hooks(self, {
        "hook_q": HookDecl("batch pos head d_head", "queries (after q_norm)", alias="q"),
        "hook_result": HookDecl("batch pos head d_model", "...", opt_in="use_attn_result"),
    })

`HookedViT.setup` walks the modules and turns the declarations into one `HookSpec` per hook
point (``model.hook_specs``): full name, named axes (TransformerLens's names), layer, stage of the
forward pass, position in the forward pass, the config flag an opt-in hook needs, and the short
name sites use. Everything that needs to know a hook's axes (sites, interventions, diagnostics,
the hook table, the docs) reads them from here; a hook point without a declaration is an error.

Components create their hook points in forward order, so the walk's order is the forward order
(a test runs a forward pass with every hook and checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformer_lens.hook_points import HookPoint

from patchlens.errors import InputError, unknown_hook_error

#: axes that index tokens: the position of a token (``query_pos`` for attention patterns)
TOKEN_AXES = ("pos", "query_pos")
HEAD_AXIS = "head"
#: the axis a sparse-autoencoder's features live on
FEATURE_AXIS = "feature"
#: config flags that switch opt-in hooks on (`HookedViT.options`)
OPTION_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")

Stage = Literal["embed", "block", "head"]


@dataclass(frozen=True)
class HookDecl:
    """A component's declaration of one hook point.

    Args:
        axes: space-separated axis names, TransformerLens style (``"batch pos head d_head"``).
        doc: what the activation is, in a few words.
        opt_in: the config flag that makes this hook fire (``"use_attn_result"``), if any.
        alias: the short name `Site` accepts for it (``"z"`` for ``blocks.{l}.attn.hook_z``).
        note: when it fires, if not always (``"explicit attention path only"``).
        axes_if: ``{config flag: axes}``: other axes while that flag is on (``ln1`` normalises
            per-head copies with ``use_split_qkv_input``).
    """

    axes: str
    doc: str = ""
    opt_in: str | None = None
    alias: str | None = None
    note: str = ""
    axes_if: Mapping[str, str] | None = None


@dataclass(frozen=True)
class HookSpec:
    """The schema entry of one hook point of a model.

    Attributes:
        name: full hook name (``"blocks.3.attn.hook_q"``).
        axes: axis names (``("batch", "pos", "head", "d_head")``).
        layer: the block it belongs to, or None before / after the blocks.
        stage: ``"embed"`` (before block 0), ``"block"`` or ``"head"`` (after the last block).
        order: position in the forward pass (0 = first hook to fire).
        opt_in: config flag that makes it fire (see `HookedViT.options`), or None.
        alias: the short name `Site` accepts (with ``layers=`` for per-block hooks), or None.
        doc, note: what it holds; when it fires if not always.
    """

    name: str
    axes: tuple[str, ...]
    layer: int | None
    stage: Stage
    order: int
    opt_in: str | None = None
    alias: str | None = None
    doc: str = ""
    note: str = ""

    def axis(self, name: str) -> int | None:
        """Index of axis ``name``, or None if the hook has no such axis."""
        return self.axes.index(name) if name in self.axes else None

    @property
    def token_axis(self) -> int | None:
        """Index of the token axis (``pos``, or ``query_pos`` for patterns), or None."""
        for a in TOKEN_AXES:
            if a in self.axes:
                return self.axes.index(a)
        return None

    @property
    def head_axis(self) -> int | None:
        return self.axis(HEAD_AXIS)

    @property
    def feature_axis(self) -> int | None:
        return self.axis(FEATURE_AXIS)

    @property
    def has_key_axis(self) -> bool:
        """True for attention scores / patterns ``[batch, head, query_pos, key_pos]``."""
        return "key_pos" in self.axes

    @property
    def shape_names(self) -> str:
        """The axes as TransformerLens writes them: ``"batch pos head d_head"``."""
        return " ".join(self.axes)

    def describe(self) -> str:
        """``name [axes]`` plus the opt-in flag, for error messages."""
        extra = f" (opt-in: {self.opt_in})" if self.opt_in else ""
        return f"{self.name} [{', '.join(self.axes)}]{extra}"


def declare_hooks(module: nn.Module, decls: Mapping[str, HookDecl]) -> None:
    """Create a `HookPoint` attribute on ``module`` for every declaration, in the given order
    (which must be the order in which they fire), and record the declarations."""
    existing = dict(getattr(module, "hook_decls", {}))
    for local, decl in decls.items():
        if not local.startswith("hook_") or "." in local:
            raise ValueError(f"Hook attribute names start with 'hook_' and have no dots: {local!r}")
        if not isinstance(decl, HookDecl):
            raise TypeError(f"declare_hooks takes HookDecl values, got {type(decl).__name__}")
        setattr(module, local, HookPoint())
        existing[local] = decl
    module.hook_decls = existing


def build_specs(root: nn.Module, flags: Mapping[str, bool] | None = None) -> dict[str, HookSpec]:
    """One `HookSpec` per `HookPoint` under ``root``, in forward order (module registration
    order), with the axes the config ``flags`` give. Raises if a hook point was not declared
    with `declare_hooks`."""
    flags = flags or {}
    specs: dict[str, HookSpec] = {}
    seen_blocks = False
    for path, module in root.named_modules():
        if not isinstance(module, HookPoint):
            continue
        parent_path, _, local = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        decl = getattr(parent, "hook_decls", {}).get(local)
        if decl is None:
            raise TypeError(
                f"Hook point {path!r} has no declared axes. Create hook points with "
                "patchlens.model.hooks.declare_hooks(module, {name: HookDecl(axes, ...)}) in the "
                "component that owns them, so the hook schema knows what they hold."
            )
        axes = decl.axes
        for flag, other in (decl.axes_if or {}).items():
            if flags.get(flag):
                axes = other
        layer = _layer_of(path)
        if layer is not None:
            seen_blocks = True
        stage: Stage = "block" if layer is not None else ("head" if seen_blocks else "embed")
        specs[path] = HookSpec(path, tuple(axes.split()), layer, stage, len(specs),
                               decl.opt_in, decl.alias, decl.doc, decl.note)
    return specs


def _layer_of(path: str) -> int | None:
    """The block index of a module path (``blocks.3.attn.hook_q`` -> 3)."""
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def build_aliases(specs: Mapping[str, HookSpec]) -> dict[str, dict[int | None, str]]:
    """``alias -> {layer (None outside the blocks): full name}``."""
    out: dict[str, dict[int | None, str]] = {}
    for s in specs.values():
        if s.alias:
            out.setdefault(s.alias, {})[s.layer] = s.name
    return out


def spec_of(specs: Mapping[str, HookSpec], name: str) -> HookSpec:
    """The spec of hook ``name`` (`UnknownHookError` with close matches if there is none)."""
    try:
        return specs[name]
    except KeyError:
        raise unknown_hook_error(name, specs) from None


def required_options(specs: Iterable[HookSpec]) -> dict[str, bool]:
    """The config flags (`HookedViT.options`) that make the opt-in hooks among ``specs`` fire."""
    return {s.opt_in: True for s in specs if s.opt_in}


def check_axis_selection(spec: HookSpec, *, tokens: bool, heads: bool,
                         features: bool = False) -> None:
    """Raise `InputError` if a selection names an axis the hook does not have."""
    wanted = [("tokens", tokens, spec.token_axis, "token", "'all'"),
              ("heads", heads, spec.head_axis, "head", "None"),
              ("features", features, spec.feature_axis, "feature", "None")]
    for arg, given, axis, what, default in wanted:
        if given and axis is None:
            raise InputError(
                f"{arg}= was given for {spec.describe()}, which has no {what} axis. Leave {arg}="
                f"{default} at this hook, or pick a hook with a {what} axis (see "
                "model.hook_specs or `patchlens hooks`)."
            )


__all__ = ["HookDecl", "HookSpec", "declare_hooks", "build_specs", "build_aliases", "spec_of",
           "required_options", "check_axis_selection", "OPTION_FLAGS", "TOKEN_AXES", "HEAD_AXIS", "FEATURE_AXIS"]
