"""Where image-text data comes from: local imagefolders, CSV / JSONL files, webdataset shards, the hub.

:func:`load_table` turns a source string into a Hugging Face ``datasets`` table plus the directory that relative
image paths are relative to:

- a directory with ``metadata.jsonl`` / ``metadata.csv`` (the ``imagefolder`` layout ``vlm data`` writes): its
  rows, ``file_name`` being the image path;
- a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file of rows (image path, caption[, label]);
- webdataset tar shards: a directory holding ``*.tar``, one ``.tar`` file, or a glob / brace pattern; read with
  ``datasets``' ``webdataset`` loader as a stream;
- anything else is a Hugging Face hub dataset name (for users with internet), optionally streamed.

Local tables are built in memory with ``datasets.Dataset.from_dict``: no Arrow cache is written to ``$HOME`` and a
20,000-row folder loads in well under a second (``load_dataset("imagefolder")`` copies every image into a cache
first, which takes minutes on these CPUs).
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class Table:
    """A loaded split: the rows, where relative paths start, and whether it is a stream."""

    data: Any  # datasets.Dataset or datasets.IterableDataset
    root: Path | None
    streaming: bool
    source: str


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return rows
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return rows


def _rows_to_dataset(rows: list[dict[str, Any]], source: Path, image_column: str) -> Any:
    import datasets

    if not rows:
        raise ValueError(f"{source}: no rows")
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for key in columns:
        columns[key] = [row.get(key) for row in rows]
    # The imagefolder convention names the image path "file_name"; expose it under the configured column.
    if image_column not in columns and "file_name" in columns:
        columns[image_column] = columns.pop("file_name")
    # Mixed types in one column (e.g. numbers and strings as labels) would stop Arrow: store those as text.
    for key, values in columns.items():
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1:
            columns[key] = [None if v is None else str(v) for v in values]
    return datasets.Dataset.from_dict(columns)


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
    source: str, split: str, image_column: str = "image", hub_config: str | None = None, streaming: bool = False
) -> Table:
    """Loads one split from a local folder / file, webdataset shards, or the hub (see the module docstring).

    Args:
        source: the folder, file, shard pattern or hub dataset name.
        split: the split to read from a hub dataset (local sources are one split each).
        image_column: the column the table's image cells should be in (``file_name`` is renamed to it).
        hub_config: the hub dataset's configuration name.
        streaming: stream a hub dataset instead of downloading it (shards always stream).

    Raises:
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
                return Table(_rows_to_dataset(_read_rows(path / name), path / name, image_column), path, False, source)
        raise ValueError(f"{source}: a directory without metadata.jsonl / metadata.csv / *.tar shards")
    if path.is_file() and path.suffix in _TABLE_SUFFIXES:
        return Table(_rows_to_dataset(_read_rows(path), path, image_column), path.parent, False, source)
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

__all__ = ["IMAGE_FALLBACKS", "LABEL_FALLBACKS", "TEXT_FALLBACKS", "Table", "load_table", "pick_column"]
