"""The embedded zoo: small ViTs trained on the clutter-digits benchmark, shipped with patchlens.

    >>> import patchlens.zoo
    >>> patchlens.zoo.list()          # names and one-line descriptions
    >>> model = patchlens.zoo.load("clutter-digits-vit")
    >>> data = patchlens.zoo.generate(16, split="test", seed=0)

Loading is offline (the weights live in the package) and checks the weights' SHA-256.
"""

from patchlens.zoo.clutter_digits import ClutterDigits, generate
from patchlens.zoo.registry import (
    UnknownModelError,
    ZooEntry,
    ZooList,
    info,
    is_zoo_name,
    list_models,
    load,
    names,
)

list = list_models  # noqa: A001  (``patchlens.zoo.list()`` reads naturally)

__all__ = [
    "ClutterDigits",
    "UnknownModelError",
    "ZooEntry",
    "ZooList",
    "generate",
    "info",
    "is_zoo_name",
    "list",
    "list_models",
    "load",
    "names",
]
