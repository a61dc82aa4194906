"""Dataset-scale runs: map a recipe over many images into resumable, checksummed shards, on one
process or many (``accelerate launch``). See docs/scaling.md.

    >>> from patchlens import run
    >>> run.dataset(run.values(patchlens.caap, layers=(2, 6)), images, "out/caap", model=model)
    >>> maps = run.load_results("out/caap")["values"]        # [n_items, gh, gw]
"""

from patchlens.run.dataset import (
    RunSummary,
    as_items,
    collate,
    dataset,
    per_batch,
    per_example,
    values,
)
from patchlens.run.launch import accelerate_command, cli_main, get_state, image_paths, shutdown
from patchlens.run.shards import ShardError, load_results

__all__ = [
    "RunSummary",
    "ShardError",
    "accelerate_command",
    "as_items",
    "cli_main",
    "collate",
    "dataset",
    "get_state",
    "image_paths",
    "load_results",
    "per_batch",
    "per_example",
    "shutdown",
    "values",
]
