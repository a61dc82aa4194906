"""Training a sparse autoencoder on a model's activations, streamed through the patching engine.

Activations at ``hook`` are captured with `patchlens.patching.engine.capture` a chunk of images
at a time, shuffled within a refill buffer and fed to the SAE in token batches. Training follows
the published recipes:

- TopK (Gao et al. 2024, arXiv 2406.04093): normalised MSE plus the AuxK loss (the residual
  reconstructed by the ``k_aux`` largest dead latents, weight 1/32); decoder rows kept at unit
  norm (and the gradient's component parallel to them removed); ``W_enc`` initialised to
  ``W_dec^T``, ``b_dec`` to the data mean.
- ReLU (Bricken et al. 2023): MSE plus ``l1 * sum_f |f|`` with unit-norm decoder rows.

Inputs are scaled by one constant so that the mean vector norm is ``sqrt(d_in)``; the scale is
folded into the weights at the end, so the returned SAE reads raw activations. Adam with a short
linear warm-up and a linear decay over the last 20% of steps.

A run with ``checkpoint=path`` saves its state (SAE, optimiser, position in the data, the
leftover buffer) every ``checkpoint_every`` steps and, started again with the same arguments,
resumes where it stopped; the resumed run is the same computation as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.engine import capture
from patchlens.sae.quality import TOKENS, evaluate, token_vectors
from patchlens.sae.sae import SAE

ImageSource = Tensor | Callable[[int], Tensor] | Iterable[Tensor]


def train(model, hook: str, images: ImageSource, *, d_sae: int, kind: str = "topk",
          k: int | None = None, l1: float = 5.0, steps: int = 1000, batch_size: int = 4096,
          lr: float = 1e-3, tokens: str = "all", chunk_images: int = 128,
          refill_images: int = 256, reuse: int = 1, aux_k: int | None = None, aux_coeff: float = 1 / 32,
          dead_tokens: int = 100_000, eval_images: Tensor | None = None,
          eval_labels: Tensor | None = None, checkpoint: str | Path | None = None,
          checkpoint_every: int = 200, seed: int = 0, progress: bool | None = None,
          dtype: torch.dtype = torch.float32) -> SAE:
    """Train an SAE on the activations of ``model`` at ``hook``.

    Args:
        hook: a full hook name (``"blocks.3.hook_resid_post"``).
        images: normalised images: a tensor ``[N, C, H, W]`` (cycled in seeded random order),
            a function ``i -> batch`` (the i-th chunk; deterministic, so resuming is exact), or an
            iterable of batches (resuming re-reads and skips the consumed ones).
        d_sae: number of features. kind: ``"topk"`` (with ``k``) or ``"relu"`` (with ``l1``).
        steps, batch_size: optimiser steps, vectors per step.
        tokens: which tokens' vectors to train on (``"all"``, ``"patches"``, ``"prefix"``,
            ``"cls"``).
        chunk_images, refill_images: images per engine `capture` call, images per shuffle
            buffer.
        aux_k, aux_coeff, dead_tokens: AuxK loss (TopK): the ``aux_k`` (default ``d_in // 2``)
            largest pre-activations among latents inactive for ``dead_tokens`` vectors.
        eval_images, eval_labels: held-out images (and labels) for the quality figures
            (`patchlens.sae.quality.evaluate`), stored in ``sae.meta["quality"]``.
        checkpoint, checkpoint_every: resumable state file and how often to write it.
        progress: tqdm bar (None: on when stderr is a terminal or a notebook).

    Returns:
        the trained `SAE` (eval mode) with ``meta["training"]`` (arguments, wall time) and,
        with ``eval_images``, ``meta["quality"]``.
    """
    args = dict(hook=hook, d_sae=d_sae, kind=kind, k=k, l1=l1, steps=steps,
                batch_size=batch_size, lr=lr, tokens=tokens, chunk_images=chunk_images,
                refill_images=refill_images, reuse=reuse, aux_k=aux_k, aux_coeff=aux_coeff,
                dead_tokens=dead_tokens, seed=seed)
    _check_args(model, hook, kind, k, steps, batch_size, tokens, chunk_images, refill_images,
                reuse)
    spec = model.hook_spec(hook)
    if spec.has_key_axis:
        raise InputError(f"SAEs read vectors; {spec.describe()} is an attention pattern.")
    state = _load_checkpoint(checkpoint, args)
    source = _Source(images, seed, chunk_images)
    t0, c0 = time.perf_counter(), time.process_time()
    if state is None:
        first = _vectors(model, hook, source, 0, refill_images, tokens)
        d_in = first.shape[-1]
        scale = math.sqrt(d_in) / float(first.double().norm(dim=-1).mean())
        sae = SAE(d_in, d_sae, kind, k=k if kind == "topk" else None, hook_name=hook,
                  dtype=dtype).init_(seed, data=first.to(dtype) * scale)
        state = {"step": 0, "refill": 1, "scale": scale, "leftover": first, "sae": None,
                 "optim": None, "since_fired": torch.zeros(d_sae, dtype=torch.long),
                 "elapsed": 0.0}
    else:
        d_in = state["d_in"]
        sae = SAE(d_in, d_sae, kind, k=k if kind == "topk" else None, hook_name=hook,
                  dtype=dtype)
        sae.load_state_dict(state["sae"])
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    if state["optim"] is not None:
        opt.load_state_dict(state["optim"])
    scale = state["scale"]
    step, refill, leftover = state["step"], state["refill"], state["leftover"]
    since_fired = state["since_fired"]
    k_aux = aux_k or max(1, d_in // 2)
    bar = _bar(steps, step, progress)
    last_ckpt = step
    try:
        while step < steps:
            if leftover.shape[0] < batch_size:  # too few vectors: read more before training
                leftover = torch.cat([leftover, _vectors(model, hook, source, refill,
                                                         refill_images, tokens)])
                refill += 1
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + refill)
            buf = torch.cat([leftover[torch.randperm(leftover.shape[0], generator=gen)]
                             for _ in range(reuse)])
            n_batches = buf.shape[0] // batch_size
            for i in range(n_batches):
                if step >= steps:
                    break
                x = buf[i * batch_size : (i + 1) * batch_size].to(dtype) * scale
                for g in opt.param_groups:
                    g["lr"] = lr * _lr_factor(step, steps)
                loss, fired = _step(sae, opt, x, kind, l1, since_fired, dead_tokens, k_aux,
                                    aux_coeff)
                since_fired += x.shape[0]
                since_fired[fired] = 0
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            # the unconsumed tail carries over (with reuse > 1 it was seen in earlier passes)
            leftover = buf[n_batches * batch_size :] if reuse == 1 else buf[:0]
            if step < steps:
                leftover = torch.cat([leftover, _vectors(model, hook, source, refill,
                                                         refill_images, tokens)])
                refill += 1
            if checkpoint is not None and (step - last_ckpt >= checkpoint_every or step >= steps):
                _save_checkpoint(checkpoint, args, {
                    "step": step, "refill": refill, "scale": scale, "leftover": leftover,
                    "sae": sae.state_dict(), "optim": opt.state_dict(), "d_in": d_in,
                    "since_fired": since_fired,
                    "elapsed": state["elapsed"] + time.perf_counter() - t0,
                    "cpu": state.get("cpu", 0.0) + time.process_time() - c0})
                last_ckpt = step
    finally:
        if bar is not None:
            bar.close()
    _fold_scale(sae, scale)
    sae.eval()
    sae.meta["training"] = {**args, "wall_time_s": round(state["elapsed"]
                                                         + time.perf_counter() - t0, 1),
                            "cpu_time_s": round(state.get("cpu", 0.0) + time.process_time() - c0,
                                                1),
                            "input_scale": scale, "images_read": refill * refill_images,
                            "torch_threads": torch.get_num_threads(),
                            "torch_version": torch.__version__}
    if eval_images is not None:
        sae.meta["quality"] = evaluate(model, sae, eval_images, eval_labels, hook=hook,
                                       tokens=tokens)
    return sae


def _check_args(model, hook, kind, k, steps, batch_size, tokens, chunk_images, refill_images,
                reuse):
    model.check_hook_names([hook])
    if kind not in ("topk", "relu"):
        raise InputError(f"train supports kind='topk' and kind='relu'; got {kind!r}.")
    if kind == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"kind='topk' needs k, a positive int; got {k!r}.")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("chunk_images", chunk_images),
                    ("refill_images", refill_images), ("reuse", reuse)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}.")
    if tokens not in TOKENS:
        raise InputError(f"tokens must be one of {', '.join(TOKENS)}; got {tokens!r}.")


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, min(100, steps // 20))
    decay_from = int(0.8 * steps)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_from:
        return max(0.0, (steps - step) / max(1, steps - decay_from))
    return 1.0


def _step(sae: SAE, opt, x: Tensor, kind: str, l1: float, since_fired: Tensor, dead_tokens: int,
          k_aux: int, aux_coeff: float) -> tuple[float, Tensor]:
    """One optimiser step on the (scaled) batch ``x [n, d_in]``; returns the loss and the
    features that fired."""
    opt.zero_grad(set_to_none=True)
    pre = sae.pre_acts(x)
    f = sae.activate(pre)
    x_hat = f @ sae.W_dec + sae.b_dec
    err = x - x_hat
    denom = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    loss = err.pow(2).sum(-1).mean() / denom
    if kind == "relu":
        loss = loss + l1 * f.abs().sum(-1).mean() / x.shape[-1]
    else:
        dead = since_fired >= dead_tokens
        if bool(dead.any()):  # AuxK: dead latents reconstruct the residual
            ka = min(k_aux, int(dead.sum()))
            masked = pre.masked_fill(~dead.to(pre.device), -float("inf"))
            vals, idx = masked.topk(ka, dim=-1)
            aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
            e_hat = aux @ sae.W_dec
            e = err.detach()
            aux_loss = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            loss = loss + aux_coeff * aux_loss.nan_to_num(0.0)
    loss.backward()
    with torch.no_grad():  # remove the gradient component parallel to the unit decoder rows
        w, g = sae.W_dec, sae.W_dec.grad
        if g is not None:
            g -= (g * w).sum(-1, keepdim=True) * w
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float(loss.detach()), (f != 0).any(0).detach().cpu()


@torch.no_grad()
def _fold_scale(sae: SAE, scale: float) -> None:
    """Make the SAE read raw activations: it was trained on ``x * scale``."""
    sae.W_enc.mul_(scale)
    sae.b_dec.div_(scale)
    sae.W_dec.div_(scale)


class _Source:
    """The i-th chunk of images of a tensor, function or iterable (see `train`)."""

    def __init__(self, images: ImageSource, seed: int, chunk: int):
        self.images, self.seed, self.chunk = images, seed, chunk
        self._it: Iterator | None = None
        self._pos = 0
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[0] == 0:
                raise InputError(f"images must be [N, C, H, W] with N > 0, got "
                                 f"{tuple(images.shape)}.")
        elif not callable(images) and not isinstance(images, Iterable):
            raise InputError("images must be a tensor [N, C, H, W], a function i -> batch, or an "
                             f"iterable of batches; got {type(images).__name__}.")

    def chunk_at(self, i: int) -> Tensor:
        x = self.images
        if isinstance(x, Tensor):
            n = x.shape[0]
            per_epoch = max(1, math.ceil(n / self.chunk))
            epoch, j = divmod(i, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            return x[perm[j * self.chunk : (j + 1) * self.chunk]]
        if callable(x):
            return x(i)
        if self._it is None or i < self._pos:
            self._it, self._pos = iter(x), 0
        while self._pos < i:  # resume: skip what an earlier run consumed
            next(self._it)
            self._pos += 1
        try:
            batch = next(self._it)
        except StopIteration:
            raise InputError(f"The image iterable ran out after {i} batches; pass more, a "
                             "tensor (cycled) or a function i -> batch.") from None
        self._pos += 1
        return batch[0] if isinstance(batch, (tuple, list)) else batch


def _vectors(model, hook: str, source: _Source, refill: int, n_images: int, tokens: str) -> Tensor:
    """Activation vectors ``[n, d_in]`` of refill number ``refill`` (``n_images`` images)."""
    out, got, i = [], 0, 0
    per = max(1, math.ceil(n_images / source.chunk))
    while got < n_images:
        xb = source.chunk_at(refill * per + i)
        model.check_images(xb)
        acts = capture(model, xb, [hook], return_type=None).acts[hook]
        out.append(token_vectors(model, acts, hook, tokens, acts.shape[-1]).float().cpu())
        got += xb.shape[0]
        i += 1
    return torch.cat(out)


def _bar(total: int, start: int, progress: bool | None):
    if progress is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="SAE", unit="step", leave=False,
                disable=None if progress is None else not progress)


# ---- checkpoints ----------------------------------------------------------------------------
def _load_checkpoint(path, args: dict) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("args") != args:
        diff = {k: (state.get("args", {}).get(k), v) for k, v in args.items()
                if state.get("args", {}).get(k) != v}
        raise InputError(f"The checkpoint {path} was written by a run with other arguments "
                         f"(checkpoint vs now: {diff}); delete it or pass another path.")
    return state["state"]


def _save_checkpoint(path, args: dict, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"args": args, "state": state}, tmp)
    os.replace(tmp, path)


__all__ = ["train"]
