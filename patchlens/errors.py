"""Errors patchlens raises. Each message says what was wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PatchlensError(Exception):
    """Base class of every error patchlens raises on purpose."""


class UnsupportedModelError(PatchlensError, TypeError):
    """The source model uses an architecture feature patchlens cannot reproduce exactly."""


class CheckpointMismatchError(PatchlensError, KeyError):
    """A state dict does not fit the configuration (missing, unexpected or mis-shaped keys)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownHookError(PatchlensError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownModelError(PatchlensError, KeyError):
    """A model name that neither the zoo, timm nor Hugging Face knows (or that cannot load offline)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(PatchlensError, ValueError):
    """An input of the wrong shape, dtype or value (NaN, empty selection, ...)."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:  # fall back to substring matches, e.g. "pattern" -> "blocks.0.attn.hook_pattern"
        found = [c for c in candidates if name in c][:n]
    return found


def unknown_hook_error(name: str, candidates: Iterable[str]) -> UnknownHookError:
    """An `UnknownHookError` for ``name`` that lists the closest real hook names."""
    matches = close_matches(name, candidates)
    hint = f" Closest hook names: {', '.join(matches)}." if matches else ""
    return UnknownHookError(
        f"Unknown hook name {name!r}.{hint} See model.hook_dict for every hook point."
    )
