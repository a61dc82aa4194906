"""User errors of the command line as one line: what was wrong and what to do.

Both ``patchlens ...`` and ``python -m patchlens.run`` print ``error: <message>`` and exit with
status 2 for these, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

from patchlens.errors import PatchlensError

USER_ERROR_EXIT = 2


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()).strip("'\"")


def user_error(e: BaseException, out: str | Path | None = None) -> str | None:
    """The one-line message for an error a user can cause (a bad argument, a missing or
    unreadable input, an unwritable output, a full disk), None for anything else. ``out`` is the
    output path of the command, named in messages about failed writes."""
    if isinstance(e, PatchlensError):
        return _one_line(str(e))
    if isinstance(e, pickle.UnpicklingError):
        return ("the checkpoint is a pickle file holding more than tensors; torch.load("
                "weights_only=True) refused it because unpickling it could run code. Convert it "
                "to .safetensors on a machine where you trust it, or pass another --model.")
    if not isinstance(e, OSError):
        return None
    where = e.filename or out
    target = f" {where}" if where else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device while writing{target}: free some space or choose "
                "another --out (a dataset run keeps its finished shards: re-run the same "
                "command to resume).")
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing{target}: free some space or choose another --out."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot access{target}: {e.strerror or 'permission denied'}; choose a "
                "path you can write (--out) and read.")
    if e.errno == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a directory; choose another path."
    if e.errno == errno.EISDIR:
        return f"{where} is a directory; pass a file path."
    if e.errno == errno.ENOENT:
        return f"file not found: {where}" if where else _one_line(str(e))
    return _one_line(f"{e.strerror or e}{': ' + str(where) if where else ''}")


def check_output_file(path: str | Path, force: bool = True) -> Path:
    """Refuse, before any work, an output file that cannot be written: under a regular file, an
    existing directory, an unwritable directory, or (``force=False``) an existing file."""
    from patchlens.errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a directory; pass a file path such as "
                         f"{path / 'report.html'}.")
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it, or another --out.")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"--out {path} is not writable; choose another --out.")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {path} cannot be created: {parent} is a file, not a "
                                 "directory.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"--out {path} cannot be created: {parent} is not writable; "
                                 "choose another --out.")
            break
    return path
