"""The main job: a short run on an embedded model that prints what patchlens sees."""

from __future__ import annotations

import time

import torch


def run_demo(model_name: str = "clutter-digits-vit") -> dict:
    """Load ``model_name``, print its hook points and a cache summary; return the summary."""
    from rich.console import Console
    from rich.table import Table

    from patchlens import HookedViT

    console = Console()
    t0 = time.perf_counter()
    model = HookedViT.from_pretrained(model_name)
    cfg = model.cfg
    console.print(f"[bold]{model_name}[/bold]: {cfg.n_layers} layers, d_model {cfg.d_model}, "
                  f"{cfg.n_heads} heads, grid {cfg.grid_size}, prefix {list(model.layout.prefix)}")
    x = _demo_images(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
    table = Table(title=f"cache of one batch ({x.shape[0]} images): {len(cache.cache_dict)} activations")
    table.add_column("hook")
    table.add_column("shape")
    table.add_column("mean |act|", justify="right")
    for name in list(cache.cache_dict)[:8] + ["hook_pooled", "hook_logits"]:
        if name in cache.cache_dict:
            act = cache[name]
            table.add_row(name, str(tuple(act.shape)), f"{act.abs().mean().item():.3f}")
    console.print(table)
    preds = logits.argmax(-1).tolist()
    console.print(f"predictions: {preds}")
    console.print(f"done in {time.perf_counter() - t0:.1f} s")
    return {"n_hooks": len(model.hook_dict), "n_cached": len(cache.cache_dict), "preds": preds}


def _demo_images(model) -> torch.Tensor:
    try:
        from patchlens.zoo.clutter_digits import generate

        data = generate(8, split="test", seed=0, image_size=model.cfg.image_size[0])
        return model.preprocess(data.images)
    except (ImportError, TypeError, ValueError):
        g = torch.Generator().manual_seed(0)
        return torch.randn(4, model.cfg.in_channels, *model.cfg.image_size, generator=g)
