"""The standard quality figures of a sparse autoencoder on a model's activations.

Reconstruction MSE, fraction of variance explained, L0 (mean active features per vector), dead
features (never active over the evaluation vectors) and what splicing the reconstruction in
(without the error term) does to the model: the change in loss and accuracy, and the share of
the loss gap to zero-ablation that the SAE recovers (as in SAELens's and ViT-Prisma's
evaluations; Bricken et al. 2023, Gao et al. 2024).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.engine import capture
from patchlens.patching.interventions import Zero
from patchlens.patching.recipe import patch
from patchlens.patching.sites import Site
from patchlens.sae.sae import SAE, check_sae

TOKENS = ("all", "patches", "prefix", "cls")


def token_vectors(model, act: Tensor, hook: str, tokens: str, d_in: int) -> Tensor:
    """The activation at ``hook`` as ``[n, d_in]`` vectors (the token axis filtered to
    ``tokens``; ``hook_z`` heads flattened)."""
    spec = model.hook_spec(hook)
    if tokens not in TOKENS:
        raise InputError(f"tokens must be one of {', '.join(TOKENS)}; got {tokens!r}.")
    tok = spec.token_axis
    if tok is not None and tokens != "all":
        n_prefix, n_tok = model.layout.n_prefix, act.shape[tok]
        idx = {"patches": list(range(n_prefix, n_tok)), "prefix": list(range(n_prefix)),
               "cls": [0] if model.cfg.class_token else []}[tokens]
        if not idx:
            raise InputError(f"tokens={tokens!r} selects nothing in this model.")
        act = act.index_select(tok, torch.tensor(idx, device=act.device))
    v = act.reshape(-1, act.shape[-1])
    if v.shape[-1] != d_in:
        v = act.reshape(-1, d_in)
    return v


def batches(images: Tensor, size: int) -> Iterable[Tensor]:
    for i in range(0, images.shape[0], size):
        yield images[i : i + size]


@torch.no_grad()
def evaluate(model, sae: Any, images: Tensor, labels: Tensor | None = None, *,
             hook: str | None = None, tokens: str = "all", batch_size: int = 128) -> dict[str, Any]:
    """Quality figures of ``sae`` at ``hook`` (default ``sae.hook_name``) on ``images``
    (normalised, ``[N, C, H, W]``).

    Returns a dict: ``mse`` (mean squared error per element), ``fve`` (fraction of variance
    explained, ``1 - sum |x - x_hat|^2 / sum |x - mean|^2``), ``cosine`` (mean cosine of x and
    x_hat), ``l0`` (mean active features per vector), ``dead`` / ``dead_fraction`` (features
    never active on these vectors), ``n_vectors``; and, spliced without the error term,
    ``loss`` / ``loss_spliced`` / ``delta_loss``, ``accuracy`` / ``accuracy_spliced`` /
    ``delta_accuracy``, ``agreement`` (same prediction as the plain model), ``loss_zero``
    (the hook zero-ablated) and ``loss_recovered = (loss_zero - loss_spliced) / (loss_zero -
    loss)``. The loss is cross-entropy against ``labels``, or against the plain model's own
    predictions when no labels are given (``labels_from: "model"``).
    """
    check_sae(sae)
    hook = hook or getattr(sae, "hook_name", None)
    if hook is None:
        raise InputError("Pass hook=: the SAE does not say which hook it reads.")
    model.check_images(images)
    if hook in model.acts_to_saes:
        raise InputError(f"An SAE is spliced at {hook}; evaluate on the plain model "
                         "(model.reset_saes()).")
    d_in = int(sae.W_dec.shape[-1])
    sq_err = cos = l0 = 0.0
    n = 0
    fired = torch.zeros(int(sae.W_dec.shape[0]), dtype=torch.bool)
    sums = sums2 = None
    logits, logits_zero = [], []
    for xb in batches(images, batch_size):
        run = capture(model, xb, [hook])
        logits.append(run.output.float().cpu())
        logits_zero.append(patch(model, xb, [(Site(hook), Zero())]).float().cpu())
        x = token_vectors(model, run.acts[hook], hook, tokens, d_in).to(sae.W_dec.dtype)
        f = sae.encode(x)
        x_hat = _reconstruct(sae, x, f)
        xd = x.double()
        sq_err += float(((xd - x_hat.double()) ** 2).sum())
        s1, s2 = xd.sum(0), (xd**2).sum(0)
        sums = s1 if sums is None else sums + s1
        sums2 = s2 if sums2 is None else sums2 + s2
        cos += float(F.cosine_similarity(xd, x_hat.double(), dim=-1).sum())
        l0 += float((f != 0).sum())
        fired |= (f != 0).any(0).cpu()
        n += x.shape[0]
    var = float((sums2 - sums**2 / n).sum())
    out: dict[str, Any] = {"n_vectors": n, "mse": sq_err / (n * d_in),
                           "fve": 1.0 - sq_err / var if var > 0 else float("nan"),
                           "cosine": cos / n, "l0": l0 / n, "dead": int((~fired).sum()),
                           "dead_fraction": float((~fired).float().mean()), "tokens": tokens}
    plain = torch.cat(logits)
    with model.saes(sae if hook == getattr(sae, "hook_name", None) else {hook: sae},
                    use_error_term=False):
        spliced = torch.cat([capture(model, xb, []).output.float().cpu()
                             for xb in batches(images, batch_size)])
    zero = torch.cat(logits_zero)
    if labels is None:
        target, out["labels_from"] = plain.argmax(-1), "model"
    else:
        target, out["labels_from"] = torch.as_tensor(labels).long().cpu(), "labels"
    loss, loss_s, loss_z = (float(F.cross_entropy(lg, target)) for lg in (plain, spliced, zero))
    acc = float((plain.argmax(-1) == target).float().mean())
    acc_s = float((spliced.argmax(-1) == target).float().mean())
    gap = loss_z - loss
    out.update(loss=loss, loss_spliced=loss_s, delta_loss=loss_s - loss, accuracy=acc,
               accuracy_spliced=acc_s, delta_accuracy=acc_s - acc,
               agreement=float((spliced.argmax(-1) == plain.argmax(-1)).float().mean()),
               loss_zero=loss_z,
               loss_recovered=(loss_z - loss_s) / gap if abs(gap) > 1e-12 else float("nan"))
    return out


def _reconstruct(sae: Any, x: Tensor, f: Tensor) -> Tensor:
    if isinstance(sae, SAE) and sae.normalize != "none":
        return sae(x)
    return sae.decode(f)


__all__ = ["evaluate", "token_vectors", "TOKENS"]
