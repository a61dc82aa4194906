"""Clutter-digits: a small benchmark with ground-truth object masks.

Each image is a ``3 x H x W`` canvas (default 64 x 64) with a noisy, mildly coloured background,
label-free clutter (thin strokes, blobs, small box outlines, speckle noise) and exactly one
handwritten digit taken from scikit-learn's ``load_digits`` scans (1797 real 8x8 scans, shipped with
scikit-learn, no download), scaled to 24-32 px and placed at a random position that is not aligned
to the 8-px patch grid. Because the digit is drawn last, ``masks`` is exactly the set of pixels
whose colour came from the digit.

Optionally a 6 x 6 px *shortcut marker* is drawn in the top-left corner; its colour encodes a label
(see :data:`MARKER_COLORS`). Neither the digit nor the clutter ever touches the corner region
``[0, CORNER) x [0, CORNER)`` (in every variant, so the marker is the only thing that differs).

Everything is a pure function of ``(n, split, seed, options)``; randomness comes from
``numpy.random.Generator`` streams that are separate for digits, background, clutter and marker, so
switching clutter or background off leaves the digits (and masks) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CORNER",
    "MARKER_BOX",
    "MARKER_COLORS",
    "ClutterDigits",
    "digit_scans",
    "generate",
    "split_indices",
]

Split = Literal["train", "test"]
Shortcut = Literal["train", "on", "off", "conflict"]

#: Side of the top-left corner region kept free of digit and clutter (pixels).
CORNER = 10
#: Marker box ``(x0, y0, x1, y1)``, end-exclusive.
MARKER_BOX = (2, 2, 8, 8)
#: One RGB colour per label 0..9 (the tab10 palette), used by the shortcut marker.
MARKER_COLORS = np.array(
    [
        [0.12, 0.47, 0.71],
        [1.00, 0.50, 0.05],
        [0.17, 0.63, 0.17],
        [0.84, 0.15, 0.16],
        [0.58, 0.40, 0.74],
        [0.55, 0.34, 0.29],
        [0.89, 0.47, 0.76],
        [0.50, 0.50, 0.50],
        [0.74, 0.74, 0.13],
        [0.09, 0.75, 0.81],
    ],
    dtype=np.float32,
)

_SPLIT_SEED = 20240611
_TRAIN_FRACTION = 0.75
_SPLIT_ID = {"train": 0, "test": 1}
_CHUNK = 256


@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scans of ``sklearn.datasets.load_digits``: images ``[1797, 8, 8]`` in [0, 1], labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=2)
def split_indices(split: Split) -> np.ndarray:
    """Indices of the scans in ``split`` (a fixed seeded 75% / 25% partition, disjoint)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = len(digit_scans()[1])
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_train = int(round(_TRAIN_FRACTION * n))
    idx = np.sort(perm[:n_train] if split == "train" else perm[n_train:])
    idx.setflags(write=False)
    return idx


@lru_cache(maxsize=16)
def _resize_matrix(size: int) -> np.ndarray:
    """Bilinear (pixel-centre) upsampling matrix ``[size, 8]``."""
    src = (np.arange(size) + 0.5) * 8.0 / size - 0.5
    src = np.clip(src, 0.0, 7.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = src - lo
    m = np.zeros((size, 8), dtype=np.float32)
    m[np.arange(size), lo] += 1.0 - w
    m[np.arange(size), hi] += w
    return m


@dataclass
class ClutterDigits:
    """A generated batch. Boxes are ``(x0, y0, x1, y1)`` in pixels, end-exclusive.

    Attributes:
        images: float ``[n, 3, H, W]`` in [0, 1] (not normalised).
        labels: long ``[n]``, the digit class.
        masks: bool ``[n, H, W]``, exactly the pixels drawn by the digit.
        boxes: long ``[n, 4]``, extents of ``masks``.
        marker_labels: long ``[n]``, label encoded by the marker, -1 where there is none.
        marker_boxes: long ``[n, 4]``, the marker's box, all -1 where there is none.
        scan_ids: long ``[n]``, index of the source scan in ``load_digits()``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    marker_labels: torch.Tensor
    marker_boxes: torch.Tensor
    scan_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, idx) -> ClutterDigits:
        """Index every field along the batch axis (int, slice, index tensor or bool mask)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return ClutterDigits(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        n_marker = int((self.marker_labels >= 0).sum())
        return f"ClutterDigits(n={n}, image_size=({h}, {w}), with_marker={n_marker})"

    @property
    def has_marker(self) -> torch.Tensor:
        """bool ``[n]``: whether a marker is drawn."""
        return self.marker_labels >= 0

    def patch_masks(
        self, patch_size: int | tuple[int, int] = 8, threshold: float | None = None
    ) -> torch.Tensor:
        """Fraction of each patch covered by the digit: float ``[n, gh, gw]``.

        With ``threshold`` the result is bool ``[n, gh, gw]``: ``fraction > threshold``
        (``threshold=0`` marks every patch touching the digit). The image size must be a multiple
        of the patch size.
        """
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        n, h, w = self.masks.shape
        if h % ph or w % pw:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {(ph, pw)}")
        frac = self.masks.float().reshape(n, h // ph, ph, w // pw, pw).mean(dim=(2, 4))
        return frac if threshold is None else frac > threshold


def _digit_params(rng, n, split, image_size, scale, grid):
    """Scan ids, sizes and top-left positions of the digits."""
    h, w = image_size
    pool = split_indices(split)
    scan = pool[rng.integers(0, len(pool), size=n)]
    size = rng.integers(scale[0], scale[1] + 1, size=n)
    xs = np.empty(n, dtype=np.int64)
    ys = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        s = size[todo]
        x = (rng.random(todo.size) * (w - s + 1)).astype(np.int64)
        y = (rng.random(todo.size) * (h - s + 1)).astype(np.int64)
        bad = (x < CORNER) & (y < CORNER)  # would touch the marker corner
        if grid:
            bad |= (x % grid == 0) | (y % grid == 0)  # would sit on the patch grid
        xs[todo[~bad]] = x[~bad]
        ys[todo[~bad]] = y[~bad]
        todo = todo[bad]
    return scan, size, xs, ys


def _background(rng, c, h, w):
    """Noisy dark background with a gentle colour gradient: ``[c, 3, h, w]``."""
    base = rng.uniform(0.02, 0.32, size=(c, 3, 1, 1)).astype(np.float32)
    grad = rng.uniform(-0.08, 0.08, size=(c, 3, 2)).astype(np.float32)
    yy = np.linspace(-1, 1, h, dtype=np.float32)[None, None, :, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, None, None, :]
    img = base + grad[..., 0, None, None] * yy + grad[..., 1, None, None] * xx
    img += 0.035 * rng.standard_normal(size=(c, 3, h, w), dtype=np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


_WIN = 13  # clutter shapes fit in a (2 * _WIN) x (2 * _WIN) window around their centre


def _clutter(rng, img, n_items):
    """Draw label-free clutter onto ``img`` ``[c, 3, h, w]`` in place.

    Shapes: straight strokes (1-2 px thick, 6-22 px long), filled ellipse blobs and small box
    outlines, each in a random colour and opacity, plus ~1.5% speckle pixels.
    """
    c, _, h, w = img.shape
    k, r = n_items[1], _WIN
    count = rng.integers(n_items[0], n_items[1] + 1, size=(c, 1))
    active = (np.arange(k)[None, :] < count)[..., None, None]
    kind = rng.integers(0, 3, size=(c, k))[..., None, None]
    px = rng.integers(0, w, size=(c, k))
    py = rng.integers(0, h, size=(c, k))
    off = rng.uniform(0, 1, size=(c, k, 2, 1, 1)).astype(np.float32)
    # window coordinates relative to the (sub-pixel) centre: [c, k, 2r, 2r]
    loc = np.arange(-r, r, dtype=np.float32) + 0.5
    rx = loc[None, None, None, :] - off[:, :, 0]
    ry = loc[None, None, :, None] - off[:, :, 1]
    # kind 0: straight stroke
    ang = rng.uniform(0, np.pi, size=(c, k, 1, 1)).astype(np.float32)
    half = rng.uniform(3, 11, size=(c, k, 1, 1)).astype(np.float32)
    thick = rng.uniform(0.8, 2.0, size=(c, k, 1, 1)).astype(np.float32)
    dx, dy = np.cos(ang), np.sin(ang)
    t = np.clip(rx * dx + ry * dy, -half, half)
    dist = np.sqrt((rx - t * dx) ** 2 + (ry - t * dy) ** 2)
    a_line = np.clip(thick / 2 + 0.5 - dist, 0.0, 1.0)
    # kind 1: filled ellipse blob, radii 1.5-4.5 px
    ra = rng.uniform(1.5, 4.5, size=(c, k, 1, 1)).astype(np.float32)
    rb = rng.uniform(1.5, 4.5, size=(c, k, 1, 1)).astype(np.float32)
    a_blob = (((rx / ra) ** 2 + (ry / rb) ** 2) <= 1.0).astype(np.float32)
    # kind 2: small axis-aligned box outline, half-sides 2-4 px
    bw = rng.integers(2, 5, size=(c, k, 1, 1))
    bh = rng.integers(2, 5, size=(c, k, 1, 1))
    ix, iy = np.abs(np.floor(rx)), np.abs(np.floor(ry))
    a_box = ((ix <= bw) & (iy <= bh) & ((ix == bw) | (iy == bh))).astype(np.float32)
    alpha = np.where(kind == 0, a_line, np.where(kind == 1, a_blob, a_box)) * active
    alpha *= rng.uniform(0.5, 1.0, size=(c, k, 1, 1)).astype(np.float32)
    color = rng.uniform(0.15, 0.95, size=(c, k, 3)).astype(np.float32)
    # composite on a padded channel-last canvas (windows never leave it)
    pad = np.zeros((c, h + 2 * r, w + 2 * r, 3), dtype=np.float32)
    pad[:, r : r + h, r : r + w] = img.transpose(0, 2, 3, 1)
    ci = np.arange(c)[:, None, None]
    win = np.arange(2 * r)
    for j in range(k):
        yi = (py[:, j, None] + win[None])[:, :, None]
        xi = (px[:, j, None] + win[None])[:, None, :]
        a = alpha[:, j, :, :, None]
        sub = pad[ci, yi, xi]
        pad[ci, yi, xi] = sub * (1.0 - a) + a * color[:, j, None, None, :]
    img[:] = pad[:, r : r + h, r : r + w].transpose(0, 3, 1, 2)
    # speckle: ~1.5% of pixels get a random colour
    speck = rng.random((c, 1, h, w), dtype=np.float32) < 0.015
    np.copyto(img, rng.random((c, 3, h, w), dtype=np.float32), where=speck)


def generate(
    n: int,
    split: Split = "test",
    seed: int = 0,
    image_size: int | tuple[int, int] = 64,
    shortcut: Shortcut | None = None,
    marker_prob: float = 0.9,
    *,
    digit_size: tuple[int, int] = (24, 32),
    clutter: bool = True,
    clutter_items: tuple[int, int] = (4, 9),
    background: bool = True,
    grid: int = 8,
    scan_ids=None,
) -> ClutterDigits:
    """Generate ``n`` clutter-digit images from the scans of ``split``.

    Args:
        n: number of images.
        split: ``"train"`` or ``"test"``: which (disjoint) set of digit scans to draw from.
        seed: seed; the output is a pure function of all arguments, but not prefix-stable
            (``generate(200, seed=s)`` differs from ``generate(2000, seed=s)[:200]``: slice a
            larger set for a subset).
        image_size: canvas size ``H`` or ``(H, W)``, each at least 64.
        shortcut: ``None``/``"off"``: no marker. ``"train"``: a marker with probability
            ``marker_prob`` encoding the true label. ``"on"``: always, true label.
            ``"conflict"``: always, encoding a label different from the true one.
        marker_prob: marker probability for ``shortcut="train"``.
        digit_size: range (inclusive) of the digit's side in pixels (the 8x8 scan is scaled).
        clutter: draw clutter (strokes, blobs, box outlines, speckle).
        clutter_items: range (inclusive) of the number of clutter shapes per image.
        background: coloured noisy background; ``False`` gives a black canvas.
        grid: digit positions avoid multiples of ``grid`` (0 to allow any position).
        scan_ids: ``[n]`` indices into `digit_scans` drawn instead of the random scans, every
            other random choice (digit position, size and colour, background, clutter, marker)
            unchanged: the same images with other digits (counterfactual inputs).

    Returns:
        A :class:`ClutterDigits` with ``images [n, 3, H, W]`` and ground truth.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 64 or w < 64:
        raise ValueError(f"image_size must be at least 64 x 64, got {(h, w)}")
    if shortcut not in (None, "train", "on", "off", "conflict"):
        raise ValueError(
            f"shortcut must be None, 'train', 'on', 'off' or 'conflict', got {shortcut!r}"
        )
    if not (digit_size[0] >= 8 and digit_size[1] <= min(h, w) - CORNER):
        raise ValueError(f"digit_size {digit_size} does not fit the canvas {(h, w)}")
    sid = _SPLIT_ID.get(split)
    if sid is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, sid, k, 0xC1D])

    rng_digit, rng_bg, rng_clutter, rng_marker = (stream(k) for k in range(4))
    scans, scan_labels = digit_scans()
    scan, size, xs, ys = _digit_params(rng_digit, n, split, (h, w), digit_size, grid)
    if scan_ids is not None:
        scan = np.asarray(torch.as_tensor(scan_ids).cpu(), dtype=np.int64).reshape(-1)
        if scan.shape != (n,) or scan.min(initial=0) < 0 or scan.max(initial=0) >= len(scans):
            raise ValueError(f"scan_ids must be {n} indices in [0, {len(scans)}), got shape "
                             f"{tuple(scan.shape)}")
    labels = scan_labels[scan]
    # digit colour: bright, each channel in [0.6, 1] (background channels are <= ~0.45)
    dcolor = rng_digit.uniform(0.6, 1.0, size=(n, 3)).astype(np.float32)

    # marker
    if shortcut in (None, "off"):
        mlab = np.full(n, -1, dtype=np.int64)
    elif shortcut == "on":
        mlab = labels.copy()
    elif shortcut == "conflict":
        mlab = (labels + 1 + rng_marker.integers(0, 9, size=n)) % 10
    else:  # train
        present = rng_marker.random(n) < marker_prob
        mlab = np.where(present, labels, -1)

    images = np.empty((n, 3, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=bool)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        c = stop - start
        img = _background(rng_bg, c, h, w) if background else np.zeros((c, 3, h, w))
        img = img.astype(np.float32)
        if clutter:
            keep = img[:, :, :CORNER, :CORNER].copy()
            _clutter(rng_clutter, img, clutter_items)
            img[:, :, :CORNER, :CORNER] = keep
        for i in range(start, stop):
            s, x, y = int(size[i]), int(xs[i]), int(ys[i])
            m = _resize_matrix(s)
            ink = m @ scans[scan[i]] @ m.T
            alpha = np.clip((ink - 0.15) / 0.55, 0.0, 1.0)
            region = img[i - start, :, y : y + s, x : x + s]
            region *= 1.0 - alpha
            region += alpha * dcolor[i, :, None, None]
            masks[i, y : y + s, x : x + s] = alpha > 0
        images[start:stop] = img
    x0, y0, x1, y1 = MARKER_BOX
    has = mlab >= 0
    images[has, :, y0:y1, x0:x1] = MARKER_COLORS[mlab[has]][:, :, None, None]

    rows, cols = masks.any(axis=2), masks.any(axis=1)
    boxes = np.stack(
        [
            cols.argmax(1),
            rows.argmax(1),
            w - cols[:, ::-1].argmax(1),
            h - rows[:, ::-1].argmax(1),
        ],
        axis=1,
    )
    mboxes = np.where(has[:, None], np.array(MARKER_BOX)[None], -1)
    return ClutterDigits(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks),
        boxes=torch.from_numpy(boxes.astype(np.int64)),
        marker_labels=torch.from_numpy(mlab.astype(np.int64)),
        marker_boxes=torch.from_numpy(mboxes.astype(np.int64)),
        scan_ids=torch.from_numpy(scan.astype(np.int64)),
    )


def erase_digits(data: ClutterDigits) -> torch.Tensor:
    """Counterfactual images for patching: each image with its target digit erased (the digit's
    pixels filled with the median colour of the rest of the image), clutter and background
    kept. Returns float ``[n, 3, H, W]`` in [0, 1]."""
    out = data.images.clone()
    for i in range(len(data)):
        mask = data.masks[i]
        out[i][:, mask] = data.images[i][:, ~mask].median(dim=1).values[:, None]
    return out
