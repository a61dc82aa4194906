"""Train the zoo models on clutter-digits (CPU is enough: ~1.2 M parameters, 64 x 64 inputs).

    python -m patchlens.zoo.train --model clutter-digits-vit --steps 1500 --seed 0 --out DIR

Training images are generated on the fly from the *train* split of the digit scans (a fresh,
seeded batch every step); the test split is only used for evaluation. Inputs are normalised with
mean = std = 0.5 per channel, which is what the saved config's ``data_mean`` / ``data_std`` say
(``model.preprocess`` applies it for you).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchlens.files import sha256_file  # noqa: F401  (re-exported)
from patchlens.zoo.clutter_digits import generate

__all__ = ["MODELS", "evaluate", "make_config", "sha256_file", "train"]

#: name -> (description, training shortcut mode)
MODELS: dict[str, tuple[str, str | None]] = {
    "clutter-digits-vit": (
        "ViT (6 layers, d_model 128, 8x8 patches) classifying the digit in a cluttered 64x64 image",
        None,
    ),
    "clutter-digits-shortcut-vit": (
        "Same ViT trained with a label-coloured corner marker on 90% of images (a shortcut)",
        "train",
    ),
}

#: fixed evaluation set: generate(EVAL_N, split="test", seed=EVAL_SEED, shortcut=mode)
EVAL_SEED = 1234
EVAL_N = 2000
SUBSET_N = 200
MEAN, STD = 0.5, 0.5


def make_config(name: str):
    """The `ViTConfig` every zoo model uses."""
    from patchlens.model.config import ViTConfig

    return ViTConfig(
        d_model=128,
        d_head=32,
        n_heads=4,
        n_layers=6,
        d_mlp=512,
        image_size=(64, 64),
        patch_size=(8, 8),
        in_channels=3,
        n_classes=10,
        class_token=True,
        pooling="token",
        act_fn="gelu",
        eps=1e-6,
        data_mean=(MEAN,) * 3,
        data_std=(STD,) * 3,
        data_interpolation="bilinear",
        data_crop_pct=1.0,
        source=f"patchlens.zoo:{name}",
    )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels ``[n]`` for unnormalised images ``[n, 3, H, W]`` in [0, 1]."""
    model.eval()
    p = next(model.parameters())
    out = [
        model(_normalise(images[i : i + batch_size]).to(p.device, p.dtype)).argmax(-1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def evaluate(
    model: torch.nn.Module, n: int = EVAL_N, shortcut: str | None = None, seed: int = EVAL_SEED
) -> dict[str, Any]:
    """Accuracy on ``generate(n, "test", seed, shortcut=shortcut)``, plus the first-200 subset.

    For ``shortcut="conflict"`` also the fraction of predictions equal to the marker's label.
    """
    data = generate(n, split="test", seed=seed, shortcut=shortcut)
    pred = predict(model, data.images)
    correct = pred == data.labels
    k = min(SUBSET_N, n)
    out: dict[str, Any] = {
        "accuracy": correct.float().mean().item(),
        "subset_n": k,
        "subset_correct": int(correct[:k].sum()),
    }
    if shortcut == "conflict":
        out["follows_marker"] = (pred == data.marker_labels).float().mean().item()
    return out


def train(
    name: str,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    label_smoothing: float = 0.1,
    seed: int = 0,
    data_seed: int = 1,
    out: str | Path = ".",
    eval_n: int = EVAL_N,
    threads: int | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train zoo model ``name``; write ``<out>/<name>.safetensors`` and ``<out>/<name>.json``.

    ``init_from`` (a ``.json`` record written by this function) starts from those weights instead
    of a random init (a second training stage with a fresh schedule); the record keeps the chain.
    Returns the json record (config, training args, evaluation, sha256, wall time).
    """
    from safetensors.torch import save_file

    from patchlens.model.hooked_vit import HookedViT

    if name not in MODELS:
        raise KeyError(f"unknown zoo model {name!r}; trainable: {sorted(MODELS)}")
    _, mode = MODELS[name]
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg = make_config(name)
    model = HookedViT(cfg)
    init_record = None
    if init_from is not None:
        from patchlens.zoo.registry import load_from

        init_record = json.loads(Path(init_from).read_text())
        model.load_state_dict(load_from(init_from).state_dict())
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.999),
    )
    warmup = min(warmup, max(steps // 10, 1))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = tqdm(range(steps), desc=name, disable=not progress)
    ema = None
    for step in bar:
        batch = generate(
            batch_size, split="train", seed=data_seed * 1_000_003 + step, shortcut=mode
        )
        logits = model(_normalise(batch.images))
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = (logits.argmax(-1) == batch.labels).float().mean().item()
        ema = acc if ema is None else 0.98 * ema + 0.02 * acc
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", train_acc=f"{ema:.3f}")
    train_wall = time.perf_counter() - t0

    model.eval()
    modes = ["clean"] if mode is None else ["clean", "on", "off", "conflict"]
    evals = {m: evaluate(model, eval_n, None if m == "clean" else m) for m in modes}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st_path = out / f"{name}.safetensors"
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(st_path), metadata={"name": name, "format": "patchlens-hookedvit"})
    st_path.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    record = {
        "name": name,
        "description": MODELS[name][0],
        "config": cfg.to_json_dict(),
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "schedule": "linear warmup, cosine decay to 0",
            "label_smoothing": label_smoothing,
            "optimizer": "AdamW(betas=(0.9, 0.999)), grad-norm clip 1.0",
            "seed": seed,
            "data_seed": data_seed,
            "data": (
                f"generate({batch_size}, split='train', seed={data_seed} * 1000003 + step, "
                f"shortcut={mode!r})"
            ),
            "normalisation": "(x - 0.5) / 0.5",
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "wall_time_s": round(train_wall, 1),
            "command": (
                f"python -m patchlens.zoo.train --model {name} --steps {steps} "
                f"--batch-size {batch_size} --lr {lr} --seed {seed} --data-seed {data_seed}"
                + ("" if init_from is None else " --init-from STAGE1.json")
            ),
            "init_from": None
            if init_record is None
            else {
                "sha256": init_record["sha256"],
                "training": init_record["training"],
                "eval": init_record["eval"],
            },
        },
        "eval": {
            "definition": (
                f"generate({eval_n}, split='test', seed={EVAL_SEED}, shortcut=MODE) with MODE "
                "None for 'clean'; subset = its first "
                f"{min(SUBSET_N, eval_n)} images"
            ),
            "n": eval_n,
            "seed": EVAL_SEED,
            **evals,
        },
        "sha256": sha256_file(st_path),
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchlens.zoo.train", description=__doc__)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=EVAL_N)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init-from", default=None, help="json record of weights to start from")
    p.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    a = p.parse_args(argv)
    rec = train(
        a.model,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        data_seed=a.data_seed,
        out=a.out,
        eval_n=a.eval_n,
        threads=a.threads,
        init_from=a.init_from,
    )
    print(
        json.dumps({"eval": rec["eval"], "wall_time_s": rec["training"]["wall_time_s"]}, indent=2)
    )


if __name__ == "__main__":
    main()
