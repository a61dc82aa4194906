"""Dataset-scale runs: map a task over many images into resumable, checksummed shards, on one
process or many (``accelerate launch``). See docs/scaling.md.

    >>> from patchlens import run
    >>> run.dataset(run.values(patchlens.caap, layers=(2, 6)), images, "out/caap", model=model)
    >>> maps = run.load_results("out/caap")["values"]        # [n_items, gh, gw]

Modules, each importing only those above it: `shards` (file format), `fingerprint` (what a
run's results depend on), `lock` (one writer per directory), `launch` (process glue),
`inputs` (items, batches, models by name), `adapters` (task functions from methods),
`progress`, `dataset` (the runner) and `cli` (the ``patchlens run`` command).
"""

from patchlens.run.adapters import per_batch, per_example, values
from patchlens.run.cli import cli_main
from patchlens.run.dataset import RunSummary, dataset
from patchlens.run.fingerprint import RunEnvironmentWarning
from patchlens.run.inputs import as_items, collate, image_paths
from patchlens.run.launch import accelerate_command, get_state, shutdown, watch_launcher
from patchlens.run.lock import RunLock, RunLockedError
from patchlens.run.shards import ShardError, load_results

__all__ = [
    "RunEnvironmentWarning",
    "RunLock",
    "RunLockedError",
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
    "watch_launcher",
]
