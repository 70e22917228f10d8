"""Errors a user can fix, each also the built-in exception callers catch (`ValueError`, `OSError`, ...): `lightning-dq`
prints one as one line naming the file, key or value and what to do, and exits 2; anything else is a bug."""

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    """Base class: an expected failure caused by input the user controls."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (names the key, the value and the accepted range)."""


class DataError(UserError, ValueError):
    """Dataset files that are corrupt, truncated, of the wrong format or version (names the file)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """Dataset files that are missing (names the directory and the files expected there)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is truncated, corrupt or from a different model configuration (names the file)."""


class TrainingDivergedError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class DiskFullError(UserError, OSError):
    """A write that found no space left on its device (names the file and the free space)."""


def disk_full(err: OSError, path: str | Path, what: str, then: str = "resume with --ckpt_path last") -> OSError:
    """`err` as a `DiskFullError` naming `path` (a `what`), its folder's free space and what to do `then`, if the
    device is full (ENOSPC, EDQUOT), else `err` itself: `raise disk_full(err, path, "checkpoint") from err`."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    full = DiskFullError(
        f"no space left on the device writing the {what} {path} ({free} in {folder}): free some space or write "
        f"elsewhere, then {then}"
    )
    full.errno = err.errno
    return full
