"""Process glue: the accelerate `PartialState`, small collectives, the launcher command and the
launcher watchdog.

One process without a launcher, ``accelerate launch`` (CPU with gloo, GPUs with nccl, several
nodes) and ``torchrun`` all end up here: `get_state` returns accelerate's `PartialState`, whose
``process_index`` / ``num_processes`` decide which shards a process computes and whose
``device`` is where the model and batches go. This module imports nothing else from
`patchlens.run`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import torch

_TRUE = ("1", "true", "yes", "on")

# Variables that torchrun (and so ``accelerate launch --multi_gpu``) or accelerate's single-process
# launcher set in the processes they start.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")
LAUNCHER_DIED_EXIT = 70  # exit status of a rank whose launcher died


def get_state(cpu: bool | None = None):
    """accelerate's `PartialState` (initialising torch.distributed when launched with several
    processes). ``cpu=None``: CPU when no GPU is visible or ``accelerate launch --cpu`` was used.

    When the process was started by a launcher, this also starts `watch_launcher`, so the
    process exits when its launcher dies."""
    from accelerate import PartialState

    watch_launcher()
    if cpu is None:
        cpu = (not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE)
    return PartialState(cpu=cpu)


def barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


def all_reduce(state, values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over all processes (identity with one process)."""
    if state.num_processes == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def shutdown(state) -> None:
    """Wait for every process and tear the process group down (call once, before a launched
    script exits: a process group left to interpreter shutdown can abort a rank)."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


# ---- launcher death -----------------------------------------------------------------------------
_watchdog: threading.Thread | None = None
_watch_lock = threading.Lock()


def launched_by_launcher() -> bool:
    """Whether this process was started by torchrun / ``accelerate launch`` (their variables
    are in the environment). ``PATCHLENS_WATCH_LAUNCHER=0`` / ``1`` overrides the guess."""
    forced = os.environ.get("PATCHLENS_WATCH_LAUNCHER", "").strip().lower()
    if forced:
        return forced in _TRUE
    return any(k in os.environ for k in LAUNCHER_ENV)


def watch_launcher(interval: float = 0.5) -> bool:
    """Exit this process (status `LAUNCHER_DIED_EXIT`) as soon as its parent, the launcher,
    dies; returns whether a watchdog runs.

    torchrun starts every rank in its own session, so killing ``accelerate launch`` with
    SIGKILL would leave the ranks running (still writing shards, or idle in a collective holding
    their memory). A daemon thread polls the parent pid every ``interval`` seconds: a changed
    parent pid means the launcher is gone (the process was re-parented). Polling works on Linux
    and macOS alike; Linux's ``prctl(PR_SET_PDEATHSIG)`` is not used because it fires when the
    parent *thread* that forked the rank exits, which need not be the launcher's death.
    Only runs under a launcher (`launched_by_launcher`), never in a plain process whose parent is
    a shell (``nohup`` runs must survive the shell). Idempotent.
    """
    global _watchdog
    with _watch_lock:
        if _watchdog is not None:
            return True
        if not launched_by_launcher():
            return False
        # (pid 1 may be the launcher itself in a container, so a parent of 1 proves nothing)
        parent = os.getppid()

        def poll() -> None:
            while True:
                time.sleep(interval)
                if os.getppid() != parent:
                    _launcher_died(parent)

        _watchdog = threading.Thread(target=poll, name="patchlens-launcher-watchdog", daemon=True)
        _watchdog.start()
        return True


def _launcher_died(parent: int) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        sys.stderr.write(f"patchlens run: rank {rank} (pid {os.getpid()}): the launcher (pid "
                         f"{parent}) died; exiting. Re-run the same command to resume.\n")
        sys.stderr.flush()
    finally:
        os._exit(LAUNCHER_DIED_EXIT)


# ---- launching ----------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on this machine (for a local ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(args: list[str], num_processes: int, port: int | None = None,
                       module: str = "patchlens.run", script: str | None = None) -> list[str]:
    """The argv of ``accelerate launch`` running ``python -m module args`` (or ``python script
    args``) in ``num_processes`` processes on this machine.

    Several processes use accelerate's torchrun launcher (``--multi_gpu``), which works on CPU
    too: `get_state` picks gloo and the CPU when no GPU is visible (``accelerate launch --cpu``
    starts a single process unless MPI is configured). To keep CPU processes on a GPU machine,
    set ``CUDA_VISIBLE_DEVICES=""`` or pass ``--cpu`` to ``patchlens.run``.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if num_processes > 1:
        cmd.append("--multi_gpu")
    return [*cmd, *([script] if script else ["-m", module]), *args]
