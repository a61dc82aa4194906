"""Cheap validity checks: large tensors, and the scalar arguments of public functions (each
error names the argument, the value and what is allowed)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from torch import Tensor

from patchlens.errors import InputError


def all_finite(x: Tensor) -> bool:
    """True if no element of ``x`` is NaN or infinite.

    One reduction instead of an elementwise mask: a NaN or inf makes the sum non-finite, and
    only a sum that overflows on finite-but-huge values needs the exact elementwise check.
    """
    return bool(x.sum().isfinite()) or bool(x.isfinite().all())


def is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool, not a float with an integer value)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None,
              none: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]`` (either bound optional); None passes with
    ``none=True``. Raises `InputError` naming ``name`` otherwise (floats such as 2.5 or 2.0
    and bools are refused: a count or an index is never fractional)."""
    if value is None and none:
        return None
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            want = f"an int in {low}..{high}"
        elif low is not None:
            want = f"an int >= {low}"
        elif high is not None:
            want = f"an int <= {high}"
        else:
            want = "an int"
        raise InputError(f"{name} must be {want}{' or None' if none else ''}, got {value!r}.")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval given by ``low`` / ``high`` (closed unless
    ``*_open``). Raises `InputError` naming ``name`` otherwise (NaN, inf, strings, bools)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = ((low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise InputError(f"{name} must be a finite number{' with ' if lo or hi else ''}"
                         f"{lo}{name if lo or hi else ''}{hi}, got {value!r}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be True or False (not a string such as ``"yes"``)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {value!r}.")
    return bool(value)
