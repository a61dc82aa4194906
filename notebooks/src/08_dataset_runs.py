# %% [markdown]
# # 08 · Dataset-scale runs: sharded, resumable sweeps
#
# `patchlens.run.dataset` maps a task (a function of a batch) over a dataset and writes the results to disk shard by
# shard; a re-run skips the shards that are finished. The same call runs under `accelerate
# launch` / `torchrun` on several processes or machines (see docs/scaling.md). Here: one
# process, CAAP maps for 24 clutter-digits images in shards of 8.

# %%
import tempfile
from pathlib import Path

import torch

import patchlens as pl
from patchlens import run
from patchlens.zoo.clutter_digits import generate

model = pl.HookedViT.from_pretrained("clutter-digits-vit")
data = generate(24, split="test", seed=5)
images = model.preprocess(data.images)
out = Path(tempfile.mkdtemp()) / "caap"
task = run.values(pl.caap, layers=(2, 6), progress=False)
summary = run.dataset(task, images, out, model=model, batch_size=8, shard_size=8,
                      progress=False)
summary

# %%
print(sorted(p.name for p in (out / "shards").iterdir()))
maps = run.load_results(out)["values"]
print("maps:", tuple(maps.shape))

# %% [markdown]
# A re-run computes nothing: every shard is there and its checksum matches. Delete one shard
# (or truncate it) and only that shard is recomputed, with identical results.

# %%
again = run.dataset(task, images, out, model=model, batch_size=8, shard_size=8, progress=False)

(out / "shards" / "000001.safetensors").write_bytes(b"truncated")
repaired = run.dataset(task, images, out, model=model, batch_size=8, shard_size=8,
                       progress=False)

print("identical after repair:", torch.equal(run.load_results(out)["values"], maps))

# %% [markdown]
# `run.json` records what the results depend on: a fingerprint of the model, the task with its
# arguments and the dataset, and the environment that bitwise reproducibility needs (torch
# version, device, dtype, threads, attention backend, batch size). Resuming with another
# fingerprint is refused before anything is computed; another environment only warns.

# %%
import json

manifest = json.loads((out / "run.json").read_text())
print("environment:", manifest["environment"])
print("recipe:", manifest["fingerprint"]["recipe"])
try:
    run.dataset(run.values(pl.caap, layers=(3, 6), progress=False), images, out, model=model,
                batch_size=8, shard_size=8, progress=False)
except pl.errors.InputError as e:
    print("refused:", str(e)[:160], "...")
