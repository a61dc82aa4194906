"""Images (PIL / path / numpy / tensor) -> the model's normalised input, offline.

The steps follow the source model's own data config, recorded in `ViTConfig` at conversion:
timm-style ``"shortest"`` (resize the shorter side to ``size / crop_pct``, centre-crop) or
Hugging Face ViT-style ``"exact"`` (resize straight to the input size), then mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from patchlens.errors import InputError
from patchlens.model.config import ViTConfig

_INTERP = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def to_float_image(img: Any) -> Float[Tensor, "chan h w"]:
    """One image as a float tensor ``[C, H, W]`` in [0, 1]. Paths and PIL images are read as RGB;
    uint8 arrays are divided by 255; float arrays/tensors are taken to be in [0, 1] already.
    Numpy arrays are ``HWC`` (or ``HW``), tensors ``CHW``."""
    from PIL import Image

    if isinstance(img, (str, Path)):
        path = Path(img)
        if not path.exists():
            raise FileNotFoundError(f"Image file {path} does not exist.")
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise InputError(f"Could not read {path} as an image ({e}).") from e
        except Image.DecompressionBombError as e:
            raise InputError(f"Refused to read {path}: {e} If you trust the file, raise "
                             "PIL.Image.MAX_IMAGE_PIXELS; otherwise pass a smaller image.") from e
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    if isinstance(img, np.ndarray):
        arr = img
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise InputError(f"A numpy image must be HxW or HxWxC, got shape {arr.shape}.")
        t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)
    elif isinstance(img, Tensor):
        t = img
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise InputError(f"A tensor image must be CxHxW, got shape {tuple(t.shape)}.")
    else:
        raise InputError(
            f"Cannot turn a {type(img).__name__} into an image; pass a PIL image, a path, a numpy "
            "array (HxWxC) or a tensor (CxHxW)."
        )
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise InputError(f"Image arrays must be uint8 or float, got {t.dtype}.")
    if not torch.isfinite(t).all():
        raise InputError("The image contains NaN or infinite values.")
    return t.float()


def preprocess(images: Any, cfg: ViTConfig) -> Float[Tensor, "batch chan h w"]:
    """A normalised batch ``[B, C, H, W]`` for a model with config ``cfg``.

    ``images``: one image or a sequence of them (see `to_float_image`), or a float batch
    tensor ``[B, C, H, W]`` with values in [0, 1].
    """
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    if isinstance(images, Tensor) and images.ndim == 4:
        batch = [to_float_image(im) for im in images]
    elif isinstance(images, (list, tuple)) or (isinstance(images, Sequence) and not isinstance(images, str)):
        if len(images) == 0:
            raise InputError("preprocess got an empty list of images.")
        batch = [to_float_image(im) for im in images]
    else:
        batch = [to_float_image(images)]
    h, w = cfg.image_size
    interp = InterpolationMode[_INTERP.get(cfg.data_interpolation, "BICUBIC")]
    out = []
    for t in batch:
        if t.shape[0] == 1 and cfg.in_channels == 3:
            t = t.expand(3, -1, -1)
        if t.shape[0] != cfg.in_channels:
            raise InputError(f"Image has {t.shape[0]} channels; the model takes {cfg.in_channels}.")
        if tuple(t.shape[-2:]) != (h, w):
            if cfg.data_resize == "exact":
                t = TF.resize(t, [h, w], interpolation=interp, antialias=True)
            else:
                scale = math.floor(min(h, w) / cfg.data_crop_pct)
                t = TF.resize(t, scale, interpolation=interp, antialias=True)
                t = TF.center_crop(t, [h, w])
        out.append(t)
    x = torch.stack(out).clamp(0, 1)
    mean = torch.tensor(cfg.data_mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data_std).view(1, -1, 1, 1)
    return (x - mean) / std


def mean_std(cfg: ViTConfig, x: Tensor) -> tuple[Tensor, Tensor]:
    """The model's input normalisation as ``[1, C, 1, 1]`` tensors in ``x``'s dtype and device."""
    c = x.shape[-3]
    mean = torch.as_tensor(cfg.data_mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(cfg.data_std, dtype=x.dtype, device=x.device)
    return mean.expand(c).view(1, c, 1, 1), std.expand(c).view(1, c, 1, 1)


def to_pixels(cfg: ViTConfig, x: Tensor) -> Tensor:
    """Undo the normalisation: model inputs -> pixel values (not clamped)."""
    mean, std = mean_std(cfg, x)
    return x * std + mean


def from_pixels(cfg: ViTConfig, pixels: Tensor) -> Tensor:
    """Pixel values -> model inputs (the source model's mean / std)."""
    mean, std = mean_std(cfg, pixels)
    return (pixels - mean) / std


def blur(cfg: ViTConfig, x: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Gaussian blur of normalised images in pixel space, returned normalised ``[B, C, H, W]``
    (the blurred context of insertion metrics and CAAP; Petsiuk et al. 2018 use kernel 11,
    sigma 5)."""
    from torchvision.transforms.functional import gaussian_blur

    from patchlens.errors import InputError

    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise InputError(f"blur_kernel must be a positive odd int, got {kernel!r}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise InputError(f"blur_sigma must be a number > 0, got {sigma!r}.")
    return from_pixels(cfg, gaussian_blur(to_pixels(cfg, x), [kernel, kernel], [float(sigma)] * 2))


def looks_unnormalised(cfg: ViTConfig, x: Tensor) -> bool:
    """True when ``x`` looks like raw ``[0, 1]`` images although the model expects them
    normalised with ``cfg.data_mean`` / ``cfg.data_std``.

    Normalisation sends a black pixel to ``-mean / std`` (ImageNet: about -2; the zoo: -1), so
    normalised natural images have values well below 0 wherever a pixel is darker than the
    mean colour. The batch is flagged only when every value lies in ``[0, 1]``, the values are
    not constant (a constant batch, e.g. the mean image, is ambiguous), and the model's
    normalisation sends black below -0.5 (models normalising to ``[0, 1]`` themselves are never
    flagged). One ``aminmax`` pass over the batch."""
    neg = min(-m / s for m, s in zip(cfg.data_mean, cfg.data_std))
    if neg > -0.5 or x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    return 0.0 <= lo and hi <= 1.0 and hi - lo > 0.05
