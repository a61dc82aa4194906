"""The hook table: the hook schema of a model, with each activation's shape on one image."""

from __future__ import annotations

import torch

from patchlens.model.capture import Capture
from patchlens.model.hooks import OPTION_FLAGS


def hook_table(model, image_size: tuple[int, int] | None = None) -> list[dict[str, str]]:
    """Rows ``{"name", "axes", "shape", "alias", "opt_in", "doc"}`` for every hook point, in
    forward order. Axes come from ``model.hook_specs``; shapes are measured on one image with
    every opt-in hook switched on and the explicit attention path taken (so scores and
    patterns fire)."""
    size = image_size or model.cfg.image_size
    p = next(model.parameters())
    x = torch.zeros(1, model.cfg.in_channels, *size, device=p.device, dtype=p.dtype)
    specs_default = model.hook_specs
    with torch.no_grad(), model.options(**dict.fromkeys(OPTION_FLAGS, True)):
        cap = Capture(list(model.hook_dict))
        with model.hooks(fwd_hooks=cap.hooks()):
            model(x)
    rows = []
    for name, spec in specs_default.items():
        act = cap.acts.get(name)
        note = spec.note or ""
        rows.append({
            "name": name,
            "axes": spec.shape_names,
            "shape": "x".join(map(str, act.shape)) if act is not None else "(does not fire here)",
            "alias": spec.alias or "",
            "opt_in": spec.opt_in or "",
            "doc": spec.doc + (f" ({note})" if note else ""),
            "layer": "" if spec.layer is None else str(spec.layer),
            "stage": spec.stage,
        })
    return rows
