"""Writing a model repository atomically.

The export builds the new repository in a temporary sibling folder (``.<name>.export-<pid>``
beside ``--out``, so on the same filesystem) and swaps it in only after every numerics gate
passed: a failed gate, an error or a killed export leaves the previous repository exactly
as it was.  The swap is one ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem
offer it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), else two renames; a first export
is one rename.  Entries of the previous repository that the export does not write (other
models someone keeps there) are copied into the new one before the swap.  Staging folders
left by a killed export are removed by the next one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 1 << 1
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (both must exist); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedRepository:
    """``with StagedRepository(out, owned) as work: ...write into work...; staged.commit()``.

    ``owned``: the top-level names the export writes (its models); every other entry of the
    previous repository is carried into the new one.  Without ``commit()`` the staging folder
    is removed on exit and ``out`` is untouched."""

    def __init__(self, out: Path, owned: set[str]):
        self.out = Path(out).absolute()
        self.owned = set(owned)
        self.work = self.out.parent / f".{self.out.name}.export-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "StagedRepository":
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(self.out))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.export-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        return self

    def previous(self, relative: str) -> Path | None:
        """A path inside the previous repository, if it exists (to carry files over)."""
        p = self.out / relative
        return p if self.out.is_dir() and p.exists() else None

    def commit(self) -> None:
        """Swap the staged repository in (carrying over the previous one's foreign entries)."""
        if self.out.is_dir():
            for entry in self.out.iterdir():
                if entry.name not in self.owned and not (self.work / entry.name).exists():
                    if entry.is_dir():
                        shutil.copytree(entry, self.work / entry.name, symlinks=True)
                    else:
                        shutil.copy2(entry, self.work / entry.name, follow_symlinks=False)
            if not _exchange(self.work, self.out):
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.work, self.out)
                self.work = old
        else:
            os.rename(self.work, self.out)
        self.committed = True
        shutil.rmtree(self.work, ignore_errors=True)   # now the previous repository

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.work, ignore_errors=True)
