"""Where `HookedViT.from_pretrained` looks for a name: a registry of model sources.

A source is a name test and a loader. The model package knows the converters (open_clip, Hugging
Face, timm); other packages register their own sources (the embedded zoo registers itself when
`patchlens.zoo` is imported, which `import patchlens` does), so the model never imports them.
Sources are tried in registration order, the built-in converters last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from patchlens.errors import UnknownModelError


@dataclass(frozen=True)
class ModelSource:
    """``matches(name)`` says whether the source takes ``name``; ``load(cls, name, **kw)``
    builds the model; ``names()`` lists what it offers (for error messages), if it can."""

    key: str
    matches: Callable[[str], bool]
    load: Callable[..., Any]
    names: Callable[[], list[str]] | None = None


_SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> None:
    """Add (or replace) a source; user and package sources come before the converters."""
    _SOURCES[source.key] = source


def sources() -> list[ModelSource]:
    builtins = [_open_clip, _hf, _timm]
    return [s for s in _SOURCES.values()] + builtins


def from_pretrained(cls, name: str, **kwargs: Any):
    """Load ``name`` from the first source that takes it."""
    for source in sources():
        if source.matches(name):
            return source.load(cls, name, **kwargs)
    listed = [n for s in _SOURCES.values() if s.names for n in s.names()]
    offered = f"not one of {', '.join(listed)}, " if listed else ""
    raise UnknownModelError(
        f"Unknown model {name!r}: {offered}not a timm model name, and not a Hugging Face repo id "
        "(use 'org/name' or 'hf:org/name') or an open_clip name ('open_clip:NAME@TAG')."
    )


def _load_open_clip(cls, name: str, **kwargs: Any):
    model_name, _, tag = name.removeprefix("open_clip:").partition("@")
    return cls.from_open_clip(model_name, pretrained=tag or None, **kwargs)


def _timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


_open_clip = ModelSource("open_clip", lambda n: n.startswith("open_clip:"), _load_open_clip)
_hf = ModelSource("hf", lambda n: n.startswith("hf:") or "/" in n,
                  lambda cls, n, **kw: cls.from_hf(n.removeprefix("hf:"), **kw))
_timm = ModelSource("timm", _timm_name,
                    lambda cls, n, **kw: cls.from_timm(n, pretrained=True, **kw))


__all__ = ["ModelSource", "register_source", "sources", "from_pretrained"]
