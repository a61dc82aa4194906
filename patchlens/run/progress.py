"""The progress bar of a dataset run."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from patchlens.run import shards as S


class Progress:
    """A tqdm bar on the main process counting finished shards of all ranks (by watching the
    sidecars in ``out_dir``) plus the main process's own batches in flight."""

    def __init__(self, out: Path, n_items: int, shard_size: int, enabled: bool):
        self.out, self.n, self.size = out, n_items, shard_size
        self.inflight = 0
        self.bar = None
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_items, unit="item", desc="patchlens run", dynamic_ncols=True)
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _done(self) -> int:
        items = 0
        with contextlib.suppress(OSError):
            for e in os.scandir(self.out / S.SHARDS):
                if e.name.endswith(".json") and not e.name.startswith("."):
                    with contextlib.suppress(ValueError):
                        start, stop = S.shard_range(int(e.name[:-5]), self.size, self.n)
                        items += max(0, stop - start)
        return items

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.n = min(self.n, self._done() + self.inflight)
            self.bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.refresh()
        if self.bar is not None:
            self.bar.close()
