"""`patchlens.keep_freed_memory`: applied on glibc, a no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys

import patchlens as pl
from patchlens import memory


def test_applies_on_glibc_in_a_fresh_process():
    """Run in a child process: the setting is process-wide and cannot be undone."""
    code = ("import patchlens, torch\n"
            "ok = patchlens.keep_freed_memory()\n"
            "x = [torch.ones(2_000_000) for _ in range(4)]; del x\n"   # allocations still work
            "print(ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = memory._glibc() is not None
    assert out.stdout.strip() == str(expected)


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory._glibc() is None
    assert pl.keep_freed_memory() is False
