"""Opening files a user or a stranger hands us, with bounds: regular files only, read whole only up to a size.

A FIFO given where a file is expected would block ``open`` forever, a character device such as ``/dev/zero`` would
be read without end, and a multi-gigabyte "labels file" would be read into memory whole. Files of the kernel's
pseudo-filesystems (``/proc``, ``/sys``, ``/dev`` and the like) pass for regular files but are not data: their size
in ``stat`` is not what reading gives (``/proc/self/pagemap`` claims 256 GiB, ``/proc/kmsg`` blocks for ever), so
they are refused wherever they are mounted. Every path vlm reads from the command line or from inside a checkpoint
goes through :func:`check_regular` (or :func:`read_bounded`, which also opens without blocking and stops at a size
limit), so such inputs get one error line instead.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

MiB = 1 << 20
TEXT_LIMIT = 16 * MiB  # a labels file, a config.json, a prompt file: far above any real one
METADATA_LIMIT = 512 * MiB  # a metadata.jsonl for millions of images


# Filesystems whose files are the kernel's views, not stored data; refused wherever they are mounted.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "configfs",
    "bpf", "pstore", "efivarfs", "fusectl", "mqueue", "binfmt_misc", "autofs", "rpc_pipefs", "nsfs", "hugetlbfs",
})  # fmt: skip


class UnsafeFileError(ValueError):
    """A path that is missing, not a regular file (a FIFO, device, socket, a kernel pseudo-file) or too large; the
    message names it."""


@functools.cache
def _mounts() -> tuple[tuple[str, str], ...]:
    """``(mount point, filesystem type)`` of every mount (``/proc/self/mounts``), longest point first; where the
    table cannot be read, the usual roots of the pseudo-filesystems."""
    table = {}
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:  # the table escapes a space in a mount point as \040
                    table[fields[1].replace("\\040", " ")] = fields[2]
    except OSError:
        table = {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs"}
    return tuple(sorted(table.items(), key=lambda item: len(item[0]), reverse=True))


def pseudo_filesystem(path: str | os.PathLike) -> str | None:
    """The mount point of the kernel pseudo-filesystem ``path`` (links resolved) lies on, or None (a regular
    filesystem, ``/dev/shm``'s tmpfs included)."""
    real = os.path.realpath(path)
    for point, kind in _mounts():
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return point if kind in PSEUDO_FILESYSTEMS else None
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str, directory_ok: bool = False) -> Path:
    """``path`` as a :class:`Path` if it is a regular file (or a directory, with ``directory_ok``).

    Symbolic links are followed (a link to a FIFO is refused like the FIFO itself). A file (or directory) on a
    kernel pseudo-filesystem (:func:`pseudo_filesystem`) is refused too.

    Raises:
        UnsafeFileError: missing, unreadable, a FIFO, device or socket, or a kernel pseudo-file; the message names
            ``what`` and the path.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UnsafeFileError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UnsafeFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode) and not directory_ok:
        raise UnsafeFileError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UnsafeFileError(f"{what} {path} is {_kind(mode)}, not a regular file")
    point = pseudo_filesystem(path)
    if point is not None:
        raise UnsafeFileError(f"{what} {path} is a kernel pseudo-file (on {point}), not a regular file")
    return path


def read_bounded(path: str | os.PathLike, what: str, limit: int = TEXT_LIMIT) -> bytes:
    """The bytes of the regular file ``path``, refusing one larger than ``limit`` bytes.

    The file is opened without blocking and checked again on the open descriptor, so a path swapped for a FIFO
    between the check and the open cannot hang the call.
    """
    path = check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UnsafeFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UnsafeFileError(f"{what} {path} is {info.st_size:,} bytes, over the {limit:,}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:  # the file grew after the fstat
        raise UnsafeFileError(f"{what} {path} is over the {limit:,}-byte limit")
    return data


def read_text_bounded(path: str | os.PathLike, what: str, limit: int = TEXT_LIMIT) -> str:
    """:func:`read_bounded` decoded as UTF-8; a file that is not UTF-8 raises :class:`UnsafeFileError`."""
    data = read_bounded(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeFileError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


__all__ = ["METADATA_LIMIT", "PSEUDO_FILESYSTEMS", "TEXT_LIMIT", "UnsafeFileError", "check_regular",
           "pseudo_filesystem", "read_bounded", "read_text_bounded"]
