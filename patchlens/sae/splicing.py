"""Where an SAE's hook points are in a model, splicing it for the duration of a computation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from patchlens.errors import InputError
from patchlens.sae.sae import check_sae, hook_name_of


@dataclass(frozen=True)
class SpliceNames:
    """Full hook names of an SAE spliced at ``hook`` (``hook + ".hook_sae_acts_post"`` ...),
    its short name for `Site` (``alias``, e.g. ``"sae_acts_post"``) and its layer."""

    hook: str
    layer: int | None
    alias: str | None

    def __getattr__(self, name: str) -> str:
        if name.startswith("hook_sae_"):
            return f"{self.hook}.{name}"
        raise AttributeError(name)

    @property
    def acts_post(self) -> str:
        return f"{self.hook}.hook_sae_acts_post"

    @property
    def site_layers(self) -> Any:
        return "all" if self.layer is None else self.layer


def resolve_hook(model, sae: Any = None, hook: str | None = None) -> str:
    """The model hook an SAE reads: ``hook``, else ``sae.hook_name``, else the one SAE spliced
    in the model."""
    if hook is None and sae is not None:
        hook = hook_name_of(sae)
    if hook is None:
        spliced = model.acts_to_saes
        if len(spliced) == 1:
            return next(iter(spliced))
        raise InputError("Which SAE? Pass sae= (with a hook_name) or hook= ("
                         f"{len(spliced)} SAEs are spliced: {sorted(spliced) or 'none'}).")
    model.check_hook_names([hook])
    return hook


@contextlib.contextmanager
def spliced(model, sae: Any = None, hook: str | None = None,
            use_error_term: bool = True) -> Iterator[SpliceNames]:
    """Make sure ``sae`` is spliced at ``hook`` for the block (with ``use_error_term`` when it
    has to be spliced here; an SAE already spliced there stays as it is). Yields its names."""
    hook = resolve_hook(model, sae, hook)
    current = model.acts_to_saes.get(hook)
    if sae is None:
        if current is None:
            raise InputError(f"No SAE is spliced at {hook}; pass sae= or model.add_sae(sae).")
        sae = current
    check_sae(sae)
    cm = (contextlib.nullcontext() if current is sae
          else model.saes({hook: sae}, use_error_term=use_error_term))
    with cm:
        spec = model.hook_spec(f"{hook}.hook_sae_acts_post")
        yield SpliceNames(hook, spec.layer, spec.alias)


__all__ = ["SpliceNames", "resolve_hook", "spliced"]
