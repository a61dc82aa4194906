"""`TokenLayout`: where each token of a ViT sits — prefix tokens by name, patches on a grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from patchlens.checks import is_int
from patchlens.errors import InputError


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of a ViT: ``prefix`` tokens first (``cls``, ``dist``, ``reg0``..), then
    the patches of a ``grid[0] x grid[1]`` grid in row-major order.

    Example: with a class token and a 14x14 grid, ``token(0, 0) == 1`` and ``rc(15) == (1, 0)``.
    """

    prefix: tuple[str, ...]
    grid: tuple[int, int]

    @classmethod
    def from_config(cls, cfg, grid: tuple[int, int] | None = None) -> TokenLayout:
        names: list[str] = []
        if cfg.class_token:
            names.append("cls")
        if cfg.distilled:
            names.append("dist")
        names += [f"reg{i}" for i in range(cfg.n_registers)]
        return cls(tuple(names), tuple(grid or cfg.grid_size))

    # ---- sizes --------------------------------------------------------------------------
    @property
    def n_prefix(self) -> int:
        return len(self.prefix)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    # ---- named tokens -------------------------------------------------------------------
    @property
    def cls(self) -> int:
        return self._named("cls")

    @property
    def dist(self) -> int:
        return self._named("dist")

    @property
    def registers(self) -> list[int]:
        return [i for i, n in enumerate(self.prefix) if n.startswith("reg")]

    @property
    def patches(self) -> list[int]:
        return list(range(self.n_prefix, self.n_tokens))

    def _named(self, name: str) -> int:
        if name not in self.prefix:
            raise InputError(
                f"This model has no {name!r} token; its prefix tokens are {list(self.prefix)}."
            )
        return self.prefix.index(name)

    # ---- grid <-> token -----------------------------------------------------------------
    def token(self, row: int, col: int) -> int:
        """Token index of the patch at grid position (row, col); negative indices count back."""
        h, w = self.grid
        if not (is_int(row) and is_int(col)):
            raise InputError(f"A patch is (row, col) ints, got ({row!r}, {col!r}).")
        r, c = row + h if row < 0 else row, col + w if col < 0 else col
        if not (0 <= r < h and 0 <= c < w):
            raise InputError(f"Patch ({row}, {col}) is outside the {h}x{w} patch grid.")
        return self.n_prefix + r * w + c

    def rc(self, token: int) -> tuple[int, int]:
        """Grid position (row, col) of a patch token."""
        if not (self.n_prefix <= token < self.n_tokens):
            raise InputError(
                f"Token {token} is not a patch token (patches are {self.n_prefix}.."
                f"{self.n_tokens - 1}; {list(self.prefix)} come first)."
            )
        p = token - self.n_prefix
        return divmod(p, self.grid[1])

    def label(self, token: int) -> str:
        """Readable name of a token: ``cls``, ``reg0`` or ``r3c5``."""
        if token < self.n_prefix:
            return self.prefix[token]
        r, c = self.rc(token)
        return f"r{r}c{c}"

    def labels(self) -> list[str]:
        return [self.label(t) for t in range(self.n_tokens)]

    def mask_tokens(self, mask: Bool[torch.Tensor, "grid_h grid_w"]) -> list[int]:
        """Token indices of the True cells of a boolean patch-grid mask (row-major order)."""
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise InputError(f"A patch mask must be boolean, got dtype {mask.dtype}.")
        if tuple(mask.shape) != tuple(self.grid):
            raise InputError(
                f"Patch mask has shape {tuple(mask.shape)} but the patch grid is {self.grid}."
            )
        return [self.n_prefix + int(i) for i in torch.nonzero(mask.flatten()).flatten()]

    def rect_tokens(self, rows: tuple[int, int] | range, cols: tuple[int, int] | range) -> list[int]:
        """Token indices of a rectangle of the grid: rows [r0, r1) x cols [c0, c1)."""
        rows = range(*rows) if isinstance(rows, tuple) else rows
        cols = range(*cols) if isinstance(cols, tuple) else cols
        return [self.token(r, c) for r in rows for c in cols]

    def to_grid(
        self, values: Float[torch.Tensor, "... n_tokens_or_patches"]
    ) -> Float[torch.Tensor, "... grid_h grid_w"]:
        """Reshape values over the patch tokens (or over all tokens: prefix dropped) to the grid."""
        n = values.shape[-1]
        if n == self.n_tokens:
            values = values[..., self.n_prefix :]
        elif n != self.n_patches:
            raise InputError(
                f"to_grid needs a last dimension of {self.n_patches} (patches) or {self.n_tokens} "
                f"(all tokens), got {n}."
            )
        return values.reshape(*values.shape[:-1], *self.grid)
