"""Atomic file writes: a crash or kill (or a power loss: the data is flushed before the rename) leaves the old
file or none, never a half-written one; a whole folder is swapped in with exchange_paths (see export/publish.py's
publish) and a swap killed half-way is undone by recover_folder. And the sha256 of a file, fast enough for a 500 MB weights file."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The file ends up with the mode a plain open() gives (0o666 less the umask), not mkstemp's 0o600,
    so an engine or sidecar written by one user can be read by the one serving it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        _fsync(tmp)  # the bytes reach the disk before the name does: no empty file after a power loss
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's: its entries) data to the disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a folder on a filesystem that does not fsync directories
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> Path:
    """A new empty `.NAME.*.tmp` next to `path`, created as open() would: the kernel applies the umask
    (and a default ACL) to 0o666, with no process-wide os.umask() swap another thread could race."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks into one reused buffer (the 124M weights, 498 MB: see docs/export.md)."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs): no instant
    sees either name missing. False where the OS or filesystem cannot (then nothing changed); other errors raise."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def backup_name(folder: Path) -> Path:
    """Where a two-rename swap parks the old `folder` for a moment: `.NAME.old-*` beside it."""
    return folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")


def recover_folder(folder: str | os.PathLike) -> bool:
    """Undo a two-rename swap killed between its renames: `folder` missing and a `.NAME.old-*` beside it -> rename
    the newest back. True if it did. Quiet when it cannot (a read-only parent): the caller's "does not exist" says it."""
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return False
    backups = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for backup in reversed(backups):
        try:
            os.rename(backup, folder)
            return True
        except OSError:
            continue
    return False
