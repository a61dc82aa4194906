"""Sparse autoencoders trained on the zoo models, shipped in ``patchlens/zoo/saes``.

    >>> patchlens.sae.zoo_saes()                      # names and one-line descriptions
    >>> sae = patchlens.sae.load("clutter-digits-vit.resid_post.2")

Each SAE is a ``NAME.safetensors`` (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) and a
``NAME.json`` record (SAELens-style config, training arguments, quality figures, SHA-256).
Retrain them with ``python -m patchlens.sae --threads 2`` (writes ``patchlens/zoo/saes``) (see docs/zoo.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError, close_matches
from patchlens.files import sha256_file
from patchlens.sae.sae import SAE

SAE_DIR = Path(__file__).resolve().parent.parent / "zoo" / "saes"

#: name -> (zoo model, hook, shortcut mode of its training images, description)
ZOO_SAES: dict[str, dict[str, Any]] = {
    "clutter-digits-vit.resid_post.2": {
        "model": "clutter-digits-vit", "hook": "blocks.2.hook_resid_post", "shortcut": None,
        "description": "TopK SAE (512 features, k=16) on the residual stream after block 2"},
    "clutter-digits-vit.resid_post.4": {
        "model": "clutter-digits-vit", "hook": "blocks.4.hook_resid_post", "shortcut": None,
        "description": "TopK SAE (512 features, k=16) on the residual stream after block 4"},
    "clutter-digits-shortcut-vit.resid_pre.0": {
        "model": "clutter-digits-shortcut-vit", "hook": "blocks.0.hook_resid_pre",
        "shortcut": "train",
        "description": "TopK SAE (512 features, k=16) on the shortcut model's residual stream "
                       "entering block 0 (trained on images with the marker on 90%)"},
}
#: the training recipe shared by the zoo SAEs (`patchlens.sae.train` arguments)
RECIPE = dict(d_sae=512, kind="topk", k=16, steps=500, batch_size=2048, lr=1e-3,
              chunk_images=128, refill_images=256, reuse=4, seed=0)
DATA_SEED = 7
EVAL = dict(n=500, split="test", seed=1234)


class ChecksumError(InputError):
    """A zoo SAE's weights do not match the SHA-256 recorded beside them."""


def _records(root: Path = SAE_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.glob("*.json"))}


def zoo_saes():
    """``[(name, description), ...]`` of the SAEs shipped with this installation."""
    from patchlens.zoo.registry import ZooEntry, ZooList

    return ZooList(ZooEntry(n, json.loads(p.read_text()).get("description", ""))
                   for n, p in _records().items())


def is_zoo_sae(name: str) -> bool:
    return isinstance(name, str) and name.removeprefix("zoo:") in _records()


def zoo_sae_info(name: str) -> dict[str, Any]:
    """The json record of a zoo SAE (config, training, quality figures, sha256)."""
    path = _records().get(name.removeprefix("zoo:"))
    if path is None:
        raise _unknown(name)
    return json.loads(path.read_text())


def _unknown(name: str) -> InputError:
    names = list(_records())
    m = close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, m))}?" if m else ""
    return InputError(f"Unknown zoo SAE {name!r}.{hint} Zoo SAEs: {', '.join(names) or 'none'}.")


def load_zoo_sae(name: str, dtype: torch.dtype | None = None, device: Any = None) -> SAE:
    """Load zoo SAE ``name`` (offline; SHA-256 checked)."""
    from safetensors.torch import load_file

    from patchlens.sae.loaders import saelens_from_dict

    key = name.removeprefix("zoo:")
    path = _records().get(key)
    if path is None:
        raise _unknown(name)
    record = json.loads(path.read_text())
    st = path.with_suffix(".safetensors")
    digest = sha256_file(st)
    if digest != record["sha256"]:
        raise ChecksumError(f"{st} has SHA-256 {digest}, but {path.name} records "
                            f"{record['sha256']}: the file is corrupted or was modified.")
    sae = saelens_from_dict(record["config"], load_file(str(st)), dtype=dtype, device=device,
                            source=f"zoo:{key}")
    sae.meta.update(format="zoo", name=key, model_name=record["model"],
                    quality=record.get("quality"), training=record.get("training"))
    return sae


# ---- training the zoo SAEs ------------------------------------------------------------------
def training_images(model, shortcut: str | None, seed: int = DATA_SEED):
    """The i-th chunk of training images of a zoo SAE (fresh clutter-digits, train split)."""
    from patchlens.zoo.clutter_digits import generate

    n = RECIPE["chunk_images"]

    def chunk(i: int) -> Tensor:
        return model.preprocess(generate(n, split="train", seed=seed * 1_000_003 + i,
                                         shortcut=shortcut).images)

    return chunk


def train_zoo_sae(name: str, out: str | Path, steps: int | None = None,
                  progress: bool | None = None) -> dict[str, Any]:
    """Train zoo SAE ``name`` with `RECIPE`, evaluate it and write ``out/NAME.safetensors``
    and ``out/NAME.json``; returns the record."""
    from safetensors.torch import save_file

    from patchlens.model.hooked_vit import HookedViT
    from patchlens.sae.train import train
    from patchlens.zoo.clutter_digits import generate

    if name not in ZOO_SAES:
        raise _unknown(name)
    spec = ZOO_SAES[name]
    model = HookedViT.from_pretrained(spec["model"]).eval()
    recipe = {**RECIPE, **({"steps": steps} if steps else {})}
    ev = generate(EVAL["n"], split=EVAL["split"], seed=EVAL["seed"], shortcut=spec["shortcut"])
    t0, c0 = time.perf_counter(), time.process_time()
    sae = train(model, spec["hook"], training_images(model, spec["shortcut"]),
                eval_images=model.preprocess(ev.images), eval_labels=ev.labels,
                progress=progress, **recipe)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()}, str(st))
    cfg = sae.config()
    cfg["metadata"]["model_name"] = spec["model"]
    record = {"name": name, "model": spec["model"], "hook": spec["hook"],
              "description": spec["description"], "config": cfg,
              "training": {**sae.meta["training"], "data": (
                  f"generate({RECIPE['chunk_images']}, split='train', seed={DATA_SEED} * "
                  f"1000003 + i, shortcut={spec['shortcut']!r}) for chunk i"),
                  "wall_time_with_eval_s": round(wall, 1),
                  "cpu_time_with_eval_s": round(cpu, 1),
                  "command": f"python -m patchlens.sae --name {name} --threads "
                             f"{torch.get_num_threads()}"},
              "quality": {**sae.meta["quality"], "eval": (
                  f"generate({EVAL['n']}, split='test', seed={EVAL['seed']}, "
                  f"shortcut={spec['shortcut']!r})")}}
    if spec["shortcut"]:
        from patchlens.sae.shortcut import marker_features

        record["marker"] = marker_features(model, sae)
    record["sha256"] = sha256_file(st)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the zoo SAEs.")
    p.add_argument("--name", action="append", help="zoo SAE name (default: all)")
    p.add_argument("--out", default=str(SAE_DIR))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    for name in a.name or list(ZOO_SAES):
        t, c = time.perf_counter(), time.process_time()
        rec = train_zoo_sae(name, a.out, a.steps)
        q = rec["quality"]
        print(f"{name}: {time.perf_counter() - t:.0f} s wall, {time.process_time() - c:.0f} s "
              f"CPU, fve {q['fve']:.3f}, l0 {q['l0']:.1f}, "
              f"dead {q['dead']}, delta acc {q['delta_accuracy']:+.3f}", flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s wall, {time.process_time():.0f} s CPU",
          flush=True)


__all__ = ["ZOO_SAES", "RECIPE", "zoo_saes", "is_zoo_sae", "zoo_sae_info", "load_zoo_sae",
           "train_zoo_sae", "ChecksumError"]
