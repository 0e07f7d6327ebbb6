"""Reading ``metadata.jsonl`` (and other JSON-lines files) one line at a time, keeping only the fields asked for.

Reading such a file whole and turning every line into a dict of everything costs many times its size: a line of
``[]`` pairs becomes one Python list per two bytes (about 30x), so a 64 MiB file took 2 GB. Here the file is read
line by line from an open descriptor (regular files only, opened without blocking, within a size bound), a line
longer than :data:`MAX_LINE` is skipped without being read into memory whole, and each row is reduced to the
fields the caller names before the next line is read. What stays in memory is what the caller keeps.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vlm.data.files import METADATA_LIMIT, UnsafeFileError, check_regular

MAX_LINE = 1 << 20  # bytes of one row: far above any real caption row
MAX_CAPTIONS_PER_IMAGE = 100  # captions one image keeps (COCO and Flickr30k have 5)
_CHUNK = 1 << 16


def _kind(mode: int) -> str:
    return "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else (
        "not a regular file")


def iter_lines(path: str | os.PathLike, what: str, limit: int = METADATA_LIMIT,
               max_line: int = MAX_LINE) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` for each line of the regular file ``path``, without its line ending; ``None`` in
    place of a line longer than ``max_line`` bytes (skipped, never held whole).

    Raises:
        UnsafeFileError: missing, a FIFO, device or socket, or larger than ``limit`` bytes (also when it grows past
            it while being read).
    """
    path = check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UnsafeFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb", buffering=_CHUNK) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped for a FIFO between the check and the open
            raise UnsafeFileError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UnsafeFileError(f"{what} {path} is {info.st_size:,} bytes, over the {limit:,}-byte limit")
        total, number = 0, 0
        while True:
            line = f.readline(max_line + 1)
            if not line:
                return
            number += 1
            total += len(line)
            too_long = len(line) > max_line and not line.endswith(b"\n")  # more than max_line bytes before it
            while too_long and not line.endswith(b"\n"):  # the rest of an over-long line, a chunk at a time
                line = f.readline(_CHUNK)
                total += len(line)
                if not line or total > limit:
                    break
            if total > limit:
                raise UnsafeFileError(f"{what} {path} grew over the {limit:,}-byte limit while being read")
            yield number, None if too_long else line.rstrip(b"\r\n")


def iter_json_rows(path: str | os.PathLike, what: str = "metadata file", limit: int = METADATA_LIMIT,
                   max_line: int = MAX_LINE) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line number, row)`` for each non-blank line of a JSON-lines file: the row as a dict, or a string saying
    why the line is not one (too long, not UTF-8, not JSON, not an object). Blank lines are skipped.

    Raises:
        UnsafeFileError: as :func:`iter_lines`.
    """
    for number, line in iter_lines(path, what, limit, max_line):
        if line is None:
            yield number, f"longer than {max_line:,} bytes"
        elif line.strip():
            yield number, parse_json_line(line)


def parse_json_line(line: bytes) -> dict[str, Any] | str:
    """One JSON-lines row as a dict, or a string saying why it is not one (not UTF-8, not JSON, not an object)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except (ValueError, RecursionError) as e:  # malformed JSON, over-long integers, nesting too deep
        return f"not JSON ({type(e).__name__})"
    return row if isinstance(row, dict) else "not a JSON object"


class Skip(str):
    """What a ``keep`` function of :func:`read_json_rows` returns for an unusable row: the reason."""


def read_json_rows(path: str | os.PathLike, keep: Callable[[dict[str, Any]], Any],
                   warn: Callable[[str], None], what: str = "metadata file",
                   limit: int = METADATA_LIMIT) -> Iterator[Any]:
    """The values ``keep(row)`` makes of the rows of a JSON-lines file, one line at a time.

    ``keep`` takes one row dict and returns what the caller stores (only the fields it needs), or a :class:`Skip`
    saying why the row is unusable. Unusable lines are counted and reported in one ``warn`` call at the end, naming the
    first (``"<path>: skipped N malformed lines (first: line K: why)"``); never one call per line.

    Raises:
        UnsafeFileError: as :func:`iter_lines`.
    """
    skipped, first = 0, ""
    for number, row in iter_json_rows(path, what, limit):
        value = keep(row) if isinstance(row, dict) else Skip(row)
        if isinstance(value, Skip):
            skipped += 1
            first = first or f"line {number}: {value}"
            continue
        yield value
    if skipped:
        warn(f"{Path(path)}: skipped {skipped} malformed line{'s' if skipped > 1 else ''} (first: {first})")


class Captions(Mapping):
    """Captions by relative image path, each image's kept as one string (``\\x00`` between captions) rather than a
    list of strings: a ``metadata.jsonl`` of many tiny captions then costs about its own size."""

    def __init__(self) -> None:
        self._joined: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, texts: list[str]) -> int:
        """Adds ``texts`` (without ``\\x00``) to ``name``'s captions, up to :data:`MAX_CAPTIONS_PER_IMAGE`; returns
        how many did not fit."""
        count = self._counts.get(name, 0)
        room = max(0, MAX_CAPTIONS_PER_IMAGE - count)
        if room and texts:
            taken = texts[:room]
            joined = "\x00".join(taken)
            self._joined[name] = f"{self._joined[name]}\x00{joined}" if count else joined
            self._counts[name] = count + len(taken)
        return max(0, len(texts) - room)

    def __getitem__(self, name: str) -> list[str]:
        return self._joined[name].split("\x00")

    def __iter__(self) -> Iterator[str]:
        return iter(self._joined)

    def __len__(self) -> int:
        return len(self._joined)


__all__ = ["MAX_CAPTIONS_PER_IMAGE", "MAX_LINE", "Captions", "Skip", "iter_json_rows", "iter_lines", "parse_json_line",
           "read_json_rows"]
