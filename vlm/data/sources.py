"""Where image-text data comes from: local imagefolders, CSV / JSONL files, webdataset shards, the hub.

:func:`load_table` turns a source string into a Hugging Face ``datasets`` table plus the directory that relative
image paths are relative to:

- a directory with ``metadata.jsonl`` / ``metadata.csv`` (the ``imagefolder`` layout ``vlm data`` writes): its
  rows, ``file_name`` being the image path;
- a directory of class sub-folders (``train/red_circle/*.png``, torchvision's ``ImageFolder`` layout): one row per
  image, its label the folder's name with underscores and hyphens as spaces (``red circle``, see
  :func:`folder_label`) and its caption that label through ``caption_template`` (``"a {}"`` -> ``a red circle``);
- a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file of rows (image path, caption[, label]);
- webdataset tar shards: a directory holding ``*.tar``, one ``.tar`` file, or a glob / brace pattern; read with
  ``datasets``' ``webdataset`` loader as a stream;
- anything else is a Hugging Face hub dataset name (for users with internet), optionally streamed.

A directory that is none of these raises :class:`DataLayoutError` naming it and the layouts accepted.

Local tables are built in memory as Arrow tables: no Arrow cache is written to ``$HOME`` and a 20,000-row folder
loads in well under a second (``load_dataset("imagefolder")`` copies every image into a cache first, which takes
minutes on these CPUs). A CSV or JSON-lines file is read one line at a time (:mod:`vlm.data.records`: regular files
only, at most :data:`~vlm.data.files.METADATA_LIMIT` bytes, lines of at most :data:`~vlm.data.records.MAX_LINE`)
and turned into Arrow every 16,384 rows or 1 MiB of the file, so memory follows the Arrow size of the data (about
the file's size), not the Python objects of every row.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.data.files import METADATA_LIMIT, check_regular, read_text_bounded
from vlm.data.records import MAX_LINE, iter_lines, parse_json_line

_CHUNK_ROWS, _CHUNK_BYTES = 1 << 14, 1 << 20  # rows, or bytes of the file, held as Python objects before Arrow
_TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


LAYOUTS = ("an imagefolder with metadata.jsonl / metadata.csv / metadata.json (file_name, caption[, label])",
           "class sub-folders of images (train/red_circle/*.png)", "webdataset *.tar shards")


class DataLayoutError(ValueError):
    """A local data folder in none of the layouts :func:`load_table` reads: the user's to fix, one line."""


@dataclass
class Table:
    """A loaded split: the rows, where relative paths start, and whether it is a stream."""

    data: Any  # datasets.Dataset or datasets.IterableDataset
    root: Path | None
    streaming: bool
    source: str


def _rows(path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """The rows of a CSV / TSV / JSON-lines / JSON file, one at a time, each with its size in the file (about)."""
    if path.suffix in (".csv", ".tsv"):
        def lines() -> Iterator[str]:
            for number, line in iter_lines(_checked(path), "table"):
                if line is None:
                    raise ValueError(f"{path}:{number}: a line of over {MAX_LINE:,} bytes")
                yield line.decode("utf-8", errors="replace") + "\n"

        for row in csv.DictReader(lines(), delimiter="\t" if path.suffix == ".tsv" else ","):
            yield row, sum(len(v) for v in row.values() if isinstance(v, str))
        return
    if path.suffix == ".jsonl":
        for number, line in iter_lines(_checked(path), "table"):
            if line is not None and not line.strip():
                continue
            row = parse_json_line(line) if line is not None else f"a line of over {MAX_LINE:,} bytes"
            if isinstance(row, str):
                raise ValueError(f"{path}:{number}: {row}")
            yield row, len(line)
        return
    rows = json.loads(read_text_bounded(path, "table", limit=METADATA_LIMIT))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: a row that is not a JSON object")
        yield row, len(row)


def _checked(path: Path) -> Path:
    return check_regular(path, "table")


def _to_arrow(values: list[Any], as_text: bool) -> Any:
    import pyarrow as pa

    return pa.array([None if v is None else str(v) for v in values] if as_text else values)


def _rows_to_dataset(rows: Iterable[dict[str, Any]], source: Path, image_column: str) -> Any:
    """``(row, size)`` pairs as an in-memory ``datasets.Dataset``, built a chunk at a time; a column holding values
    of several types (numbers and strings as labels) is stored as text, as Arrow needs one type per column."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    chunks: dict[str, list[Any]] = {}  # column -> Arrow arrays, one per chunk
    kinds: dict[str, set[type]] = {}
    pending: dict[str, list[Any]] = {}
    count = 0

    def flush(n: int) -> None:
        for key in kinds:
            values = pending.get(key) or []
            values += [None] * (n - len(values))  # a column the chunk never mentioned
            try:
                chunks.setdefault(key, []).append(_to_arrow(values, len(kinds[key]) > 1))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # e.g. lists of mixed items: keep as text
                kinds[key].add(str)
                chunks[key].append(_to_arrow(values, True))
        pending.clear()

    in_chunk = chunk_bytes = 0
    for row, size in rows:
        for key, value in row.items():
            if key not in kinds:
                kinds[key] = set()
                before = count - in_chunk  # rows of earlier chunks; this chunk's are padded in pending
                chunks[key] = [pa.nulls(before)] if before else []
            if value is not None:
                kinds[key].add(type(value))
            column = pending.setdefault(key, [])
            column += [None] * (in_chunk - len(column))
            column.append(value)
        count, in_chunk, chunk_bytes = count + 1, in_chunk + 1, chunk_bytes + size
        if in_chunk == _CHUNK_ROWS or chunk_bytes >= _CHUNK_BYTES:
            flush(in_chunk)
            in_chunk = chunk_bytes = 0
    if not count:
        raise ValueError(f"{source}: no rows")
    flush(in_chunk)
    columns = {key: _join(parts, len(kinds[key]) > 1) for key, parts in chunks.items()}
    # The imagefolder convention names the image path "file_name"; expose it under the configured column.
    if image_column not in columns and "file_name" in columns:
        columns[image_column] = columns.pop("file_name")
    return datasets.Dataset(InMemoryTable(pa.table(columns)))


def _join(parts: list[Any], as_text: bool) -> Any:
    """One column from its chunks: as text if its values had several types (chunks typed before that was known are
    converted), else the chunks as they are, or re-typed together where Arrow inferred them differently."""
    import pyarrow as pa

    parts = [p for p in parts if len(p)] or parts[:1]
    if as_text:
        parts = [p if pa.types.is_string(p.type) or pa.types.is_null(p.type) else _to_arrow(p.to_pylist(), True)
                 for p in parts]  # fmt: skip
    types = {p.type for p in parts if not pa.types.is_null(p.type)}
    if len(types) > 1:  # e.g. [] in one chunk (list<null>) and ["a"] in another (list<string>)
        return pa.array([v for p in parts for v in p.to_pylist()])
    kind = types.pop() if types else pa.null()
    return pa.chunked_array([p.cast(kind) if pa.types.is_null(p.type) else p for p in parts], type=kind)


def folder_label(name: str) -> str:
    """A class sub-folder's name as a label: underscores and hyphens become spaces (``red_circle`` -> ``red circle``).

    Args:
        name: the folder's name.

    Returns:
        The label, runs of spaces collapsed; the name itself if that leaves nothing (a folder named ``_``).
    """
    return " ".join(re.sub(r"[_-]+", " ", name).split()) or name


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in _IMAGE_EXTENSIONS and "." in name


def _class_folder_rows(path: Path, caption_template: str) -> list[tuple[dict[str, Any], int]]:
    """The rows of a folder of class sub-folders, in sorted order: ``file_name`` (relative to ``path``), ``caption``
    and ``label``; empty if no sub-folder holds an image.

    Images may sit at any depth below their class folder (as torchvision's ``ImageFolder`` reads them); links to
    folders are not followed, so a link cannot pull in a tree outside the dataset or loop. Hidden entries are skipped.
    """
    rows = []
    classes = sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    for name in classes:
        label = folder_label(name)
        try:
            caption = caption_template.format(label)
        except (IndexError, KeyError, ValueError):  # a named field or a stray brace: the template is wrong
            raise ValueError(f"caption template {caption_template!r} needs exactly one plain {{}}") from None
        for folder, dirs, files in os.walk(path / name, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: a reproducible row order
            for file in sorted(f for f in files if _is_image(f)):
                relative = os.path.relpath(os.path.join(folder, file), path)
                rows.append(({"file_name": relative, "caption": caption, "label": label}, len(relative)))
    return rows


def _shard_files(source: str) -> list[str] | None:
    """The tar files a source names, or None if it does not name shards."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
        return files or None
    if path.suffix == ".tar" and path.is_file():
        return [str(path)]
    if any(ch in source for ch in "*?[{"):
        patterns = _expand_braces(source)
        files = sorted({f for p in patterns for f in glob.glob(p)})
        if all(f.endswith(".tar") for f in files) and files:
            return files
    return None


def _expand_braces(pattern: str) -> list[str]:
    """``shard-{000..002}.tar`` -> three names (the webdataset convention); other patterns unchanged."""
    start = pattern.find("{")
    end = pattern.find("}", start)
    if start < 0 or end < 0:
        return [pattern]
    inner = pattern[start + 1 : end]
    if ".." in inner:
        lo, hi = inner.split("..", 1)
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = inner.split(",")
    return [e for opt in options for e in _expand_braces(pattern[:start] + opt + pattern[end + 1 :])]


def _webdataset_features(shard: str) -> Any:
    """Columns of a webdataset shard from its member names: images, text (``.txt``) and integers (``.cls``)."""
    import tarfile

    import datasets

    with tarfile.open(shard) as tar:
        fields = {name.split("/")[-1].split(".", 1)[1] for name in tar.getnames() if "." in name.split("/")[-1]}
    features = {}
    for name in sorted(fields):
        ext = name.rsplit(".", 1)[-1].lower()
        if ext in _IMAGE_EXTENSIONS:
            features[name] = datasets.Image()
        elif ext in ("txt", "text"):
            features[name] = datasets.Value("string")
        elif ext in ("cls", "cls2", "index", "id"):
            features[name] = datasets.Value("int64")
        else:
            raise ValueError(f"{shard}: samples have different fields and a {name!r} field whose type is unknown; "
                             "give every sample the same fields")
    features["__key__"] = datasets.Value("string")
    features["__url__"] = datasets.Value("string")
    return datasets.Features(features)


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in _TABLE_SUFFIXES | {".tar"}


def load_table(
    source: str,
    split: str,
    image_column: str = "image",
    hub_config: str | None = None,
    streaming: bool = False,
    caption_template: str = "{}",
) -> Table:
    """Loads one split from a local folder / file, webdataset shards, or the hub (see the module docstring).

    Args:
        source: the folder, file, shard pattern or hub dataset name.
        split: the split to read from a hub dataset (local sources are one split each).
        image_column: the column the table's image cells should be in (``file_name`` is renamed to it).
        hub_config: the hub dataset's configuration name.
        streaming: stream a hub dataset instead of downloading it (shards always stream).
        caption_template: for a folder of class sub-folders, the caption of each image: ``{}`` is replaced by the
            folder's label (the default, ``{}``, makes the label itself the caption).

    Raises:
        DataLayoutError: a directory in none of the layouts (the message names it and the layouts accepted).
        ValueError / FileNotFoundError: with a message naming the source.
    """
    import datasets

    source = str(source)
    shards = _shard_files(source)
    if shards is not None:
        try:
            data = datasets.load_dataset("webdataset", data_files={split: shards}, split=split, streaming=True)
        except ValueError:
            # Hugging Face infers the columns from the first 5 samples and gives up when one of them lacks a
            # field (a sample with no caption); the shard's member names give the columns instead.
            features = _webdataset_features(shards[0])
            data = datasets.load_dataset("webdataset", data_files={split: shards}, split=split, streaming=True,
                                         features=features)
        return Table(_undecoded(data), None, True, source)
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("metadata.jsonl", "metadata.csv", "metadata.json"):
            if (path / name).is_file():
                return Table(_rows_to_dataset(_rows(path / name), path / name, image_column), path, False, source)
        rows = _class_folder_rows(path, caption_template)
        if rows:
            return Table(_rows_to_dataset(rows, path, image_column), path, False, source)
        raise DataLayoutError(f"{source}: a directory without metadata.jsonl / metadata.csv / metadata.json, class "
                              f"sub-folders of images or *.tar shards; vlm reads {'; or '.join(LAYOUTS)}")
    if path.is_file() and path.suffix in _TABLE_SUFFIXES:
        return Table(_rows_to_dataset(_rows(path), path, image_column), path.parent, False, source)
    if path.exists() or _looks_local(source):
        raise FileNotFoundError(f"{source}: no such dataset file or directory (expected an imagefolder directory, "
                                f"a .csv/.jsonl file, or .tar shards)")
    data = datasets.load_dataset(source, hub_config, split=split, streaming=streaming)
    return Table(_undecoded(data), None, streaming, source)


def _undecoded(data: Any) -> Any:
    """Image columns as raw bytes: vlm decodes them itself (robustly, see :func:`vlm.data.images.load_image`)."""
    import datasets

    features = getattr(data, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            data = data.cast_column(name, datasets.Image(decode=False))
    return data


def pick_column(columns: list[str], wanted: str | None, fallbacks: tuple[str, ...], what: str, source: str) -> str:
    """``wanted`` if the table has it, else the first present fallback (e.g. webdataset's ``png`` / ``txt``)."""
    if wanted in columns:
        return wanted
    for name in fallbacks:
        if name in columns:
            return name
    raise ValueError(f"{source}: no {what} column {wanted!r}; columns are {sorted(columns)}")


IMAGE_FALLBACKS = ("image", "file_name", *_IMAGE_EXTENSIONS)
TEXT_FALLBACKS = ("caption", "text", "txt")
LABEL_FALLBACKS = ("label", "label.txt", "cls")

def captions_and_labels(dataset: Any) -> tuple[list[str], list[str]] | None:
    """A built data set's captions and labels ("" where a row has none), in memory or read off its table; None for
    one that holds neither (a stream)."""
    if hasattr(dataset, "captions") and hasattr(dataset, "labels"):
        return list(dataset.captions), list(dataset.labels)
    if getattr(dataset, "table", None) is None:
        return None
    captions = [str(c) for c in dataset.table[dataset.text_column][:]]
    if not getattr(dataset, "label_column", None):
        return captions, [""] * len(captions)
    return captions, ["" if v is None else str(v) for v in dataset.table[dataset.label_column][:]]


__all__ = ["IMAGE_FALLBACKS", "LABEL_FALLBACKS", "LAYOUTS", "TEXT_FALLBACKS", "DataLayoutError", "Table",
           "captions_and_labels", "folder_label", "load_table", "pick_column"]
