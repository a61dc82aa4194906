"""A trained intervention as a dataset-run recipe (`patchlens.run.dataset`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.recipe import patch
from patchlens.patching.sites import Site
from patchlens.patching.trainable import TrainableIntervention, load_intervention, site_to_json


def _pair(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    if "base" in batch and "source" in batch:
        return batch["base"], batch["source"]
    if "corrupted" in batch and "clean" in batch:  # activation patching's naming
        return batch["corrupted"], batch["clean"]
    raise InputError(f"An interchange batch needs 'base' and 'source' (or 'corrupted' = base and "
                     f"'clean' = source); its keys are {sorted(batch)}.")


def interchange_recipe(intervention: TrainableIntervention | str | Path, site: Site | None = None):
    """A recipe function ``fn(model, batch) -> dict`` for `patchlens.run.dataset` that patches
    each item's source into its base with a trained intervention.

    Args:
        intervention: a trained intervention, or the path of one saved with ``.save`` (loaded
            here, once per process of a launched run).
        site: where to apply it; default: the site it was trained at (stored in the file).

    Batch fields: ``base`` and ``source`` images (or ``corrupted`` = base and ``clean`` =
    source, the activation-patching names that image-file pairs get), and optionally ``labels``
    (the counterfactual labels). Returns ``logits [B, n_classes]``, ``prediction [B]`` and, with
    labels, ``correct [B]`` (its mean over the dataset is the IIA).
    """
    iv = load_intervention(intervention) if isinstance(intervention, (str, Path)) else intervention
    if not isinstance(iv, TrainableIntervention) or not iv.built:
        raise InputError(f"interchange_recipe needs a trained intervention or its file, got {iv!r}.")
    site = site if site is not None else iv.site
    if not isinstance(site, Site):
        raise InputError(f"{iv!r} records no site; pass site=Site(...).")

    def interchange(model, batch):
        base, source = _pair(batch)
        p = next(model.parameters())
        iv.to(device=p.device, dtype=p.dtype)
        logits = patch(model, base, [(site, iv.with_source(source))])
        out = {"logits": logits, "prediction": logits.argmax(-1)}
        if "labels" in batch:
            labels = torch.as_tensor(batch["labels"], device=logits.device)
            out["correct"] = (out["prediction"] == labels).to(torch.uint8)
        return out

    interchange.__name__ = f"interchange[{type(iv).__name__}]"
    # what a resumed dataset run checks (`patchlens.run.fingerprint`): the parameters' digests
    interchange.run_spec = {"adapter": "das.interchange_recipe", "class": type(iv).__name__,
                            "config": iv.config(), "site": site_to_json(site),
                            "parameters": {k: v.detach() for k, v in iv.state_dict().items()}}
    return interchange


__all__ = ["interchange_recipe"]
