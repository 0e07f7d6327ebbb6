"""JSON from a file read piece by piece, so that no part of it can expand into millions of Python objects.

``json.loads`` turns every ``[]`` of a text into a Python list (about 30 times its two bytes), so a header or record
of a few hundred megabytes could take gigabytes. :class:`JsonPieces` walks a JSON text instead: the caller enters
objects and arrays one level at a time and decodes only strings (which cost their own length) and values of at most
:data:`SMALL` characters. :func:`read_safetensors_header` uses it to read a safetensors header (the tensor entries
and the ``__metadata__`` strings) with a size bound, without the copies a library makes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

SMALL = 4096  # characters of a JSON value other than a string that is decoded whole
_WS = re.compile(r"[ \t\n\r]*")
_DECODE = json.JSONDecoder().raw_decode


class JsonPieces:
    """A JSON text read piece by piece: containers are entered one level at a time and only strings (which cost
    their own length) or values of at most :data:`SMALL` characters are decoded whole, so no part of a header can
    expand into millions of Python objects."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self) -> str:
        self.pos = _WS.match(self.text, self.pos).end()
        return self.text[self.pos : self.pos + 1]

    def take(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at character {self.pos}")
        self.pos += 1

    def value(self):  # noqa: ANN201 - any JSON value
        if self.peek() == '"':
            value, self.pos = _DECODE(self.text, self.pos)
            return value
        window = self.text[self.pos : self.pos + SMALL]
        cut = len(window) == SMALL and self.pos + SMALL < len(self.text)
        try:
            value, end = _DECODE(window)
        except ValueError:
            if cut:  # it may only be too long for the window
                raise ValueError(f"a value longer than {SMALL:,} characters at character {self.pos}") from None
            raise
        if cut and end == len(window):  # a number may have been cut at the window's end
            raise ValueError(f"a value longer than {SMALL:,} characters at character {self.pos}")
        self.pos += end
        return value

    def _members(self, close: str, keyed: bool) -> Iterator[str | None]:
        self.take("[" if close == "]" else "{")
        if self.peek() == close:
            self.pos += 1
            return
        while True:
            if keyed:
                key = self.value() if self.peek() == '"' else None
                if not isinstance(key, str):
                    raise ValueError(f"expected a key at character {self.pos}")
                self.take(":")
                yield key
            else:
                yield None
            char = self.peek()
            self.pos += 1
            if char == close:
                return
            if char != ",":
                raise ValueError(f"expected ',' or {close!r} at character {self.pos - 1}")

    def keys(self) -> Iterator[str]:
        """The keys of the object that starts here; the caller reads each value before the next key."""
        yield from self._members("}", keyed=True)

    def items(self) -> Iterator[None]:
        """One step per element of the array that starts here; the caller reads each element."""
        yield from self._members("]", keyed=False)

    def end(self) -> None:
        if self.peek():
            raise ValueError(f"unexpected text at character {self.pos}")


def read_safetensors_header(f: BinaryIO, size: int, max_header: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """The header of the safetensors file ``f`` (``size`` bytes, read from its start): the tensor entries (each
    value at most :data:`SMALL` characters), the ``__metadata__`` strings, and where the tensor data starts.

    Raises:
        ValueError: not a safetensors header, one over ``max_header`` bytes or past the end of the file, or keys
            given twice.
    """
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", head)
    if length > max_header or 8 + length > size:
        raise ValueError(f"not a safetensors file, or a header of {length:,} bytes (at most {max_header:,} and "
                         f"the file's size)")
    try:
        return _header(f.read(length)) + (8 + length,)
    except (ValueError, RecursionError) as e:  # malformed JSON, not UTF-8, keys twice, nested without end
        raise ValueError(f"not a safetensors file ({e})") from None


def _header(raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    reader = JsonPieces(raw.decode("utf-8"))
    entries: dict = {}
    record = None
    for key in reader.keys():
        if key in entries or (key == "__metadata__" and record is not None):
            raise ValueError(f"the header names {key!r} twice")
        if key == "__metadata__":
            record = {}
            for name in reader.keys():
                value = reader.value()
                if not isinstance(value, str):
                    raise ValueError("__metadata__ values must be strings")
                record[name] = value
        else:
            entries[key] = reader.value()
    reader.end()
    return entries, record or {}


__all__ = ["SMALL", "JsonPieces", "read_safetensors_header"]


