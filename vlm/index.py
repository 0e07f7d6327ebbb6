"""Image search over a folder with a CLIP checkpoint (``vlm index``, ``vlm search``), and the folder reading and
image embedding that retrieval recall (``vlm retrieval``, :mod:`vlm.retrieval`) shares with it; the commands
themselves are in :mod:`vlm.cli`.

The index is one safetensors file: ``embeddings`` (float32, (n, embed_dim), unit length) and, in the header's
metadata, a JSON record: the images folder, each image's relative path with its size and ``mtime_ns``, the
checkpoint's path and SHA-256 fingerprint, the embedding width. Nothing is pickled; the file is replaced atomically.
A re-run embeds only new or changed images and drops removed ones; an index of another checkpoint is refused.

An index is read within bounds (:func:`load_index`): header size, entry count, and the tensor's shape checked
against the record and the file's size before it is read. Images are decoded one at a time (:func:`embed_files`),
in worker processes ahead of the model with ``--workers``.

Exit codes: 0 done, 1 some image could not be read (one stderr line each; the rest are used), 2 usage error (bad
arguments, a missing, refused or mismatched checkpoint or index; one ``vlm <command>: error:`` line).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from vlm.data.files import METADATA_LIMIT, UnsafeFileError, check_regular
from vlm.data.jsonpieces import JsonPieces, read_safetensors_header
from vlm.data.prefetch import default_workers, model_inputs
from vlm.data.records import MAX_CAPTIONS_PER_IMAGE, Captions, Skip, read_json_rows
from vlm.formats import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from vlm.inference import CLIPPredictor, load
from vlm.inputs import IMAGE_SUFFIXES, METADATA_FILE, printable

FORMAT, VERSION, META_KEY = "vlm-image-index", 1, "vlm_index"
MAX_TOP_K, MAX_BATCH_SIZE, MAX_EMBED_DIM = 1000, 4096, 1 << 16
MAX_INDEX_FILES = 1 << 22  # images in one index (4,194,304)
MAX_HEADER = 512 << 20  # bytes of an index's header: room for MAX_INDEX_FILES entries with long relative paths


class IndexFileError(ValueError):
    """An index that is missing, not a vlm index, or built with another checkpoint; the message names the file."""


@dataclass
class ImageIndex:
    """A loaded index: row i of ``embeddings`` (n, embed_dim) is ``files[i]``, a path relative to ``root``, whose
    size and ``mtime_ns`` were ``stats[i]`` when it was embedded with the checkpoint of that ``fingerprint``."""

    root: Path
    files: list[str]
    stats: Sequence[tuple[int, int]]
    embeddings: Tensor
    checkpoint: str
    fingerprint: str

    @property
    def paths(self) -> list[Path]:
        return [self.root / name for name in self.files]


@dataclass
class IndexReport:
    """What :func:`build_index` did: images in the index, embedded now, reused, dropped, and those it skipped."""

    total: int
    embedded: int
    reused: int
    removed: int
    failed: dict[str, str]  # relative path -> why it was skipped


def fingerprint(checkpoint: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a checkpoint file's contents, or of an export folder's config and weights; raises
    :class:`~vlm.formats.CheckpointError` for a missing one, or a FIFO, device or socket (which would never end)."""
    try:
        path = check_regular(checkpoint, "checkpoint", directory_ok=True)
        files = [path / n for n in (CONFIG_FILE, WEIGHTS_FILE) if (path / n).exists()] if path.is_dir() else [path]
        digest = hashlib.sha256()
        for file in files:  # the contents only: a moved or renamed checkpoint is the same model
            with open(check_regular(file, "checkpoint file"), "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {e.strerror or e}") from None
    return f"sha256:{digest.hexdigest()}"


def _write_index(index: ImageIndex, out: Path) -> None:
    record = {"format": FORMAT, "version": VERSION, "root": str(index.root), "checkpoint": index.checkpoint,
              "fingerprint": index.fingerprint, "embed_dim": index.embeddings.shape[1],
              "files": [[n, *s] for n, s in zip(index.files, index.stats)]}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".tmp-{out.name}-")
    os.close(fd)
    try:  # ensure_ascii: file names that are not UTF-8 travel as \udcXX escapes, the header stays valid UTF-8
        save_file({"embeddings": index.embeddings.float().contiguous()}, tmp, metadata={META_KEY: json.dumps(record)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _relative_name(name: object) -> bool:
    return (isinstance(name, str) and bool(name) and "\x00" not in name and not PurePath(name).is_absolute()
            and ".." not in PurePath(name).parts)  # fmt: skip


class _Stats(Sequence):
    """``(size, mtime_ns)`` per file, stored as two int64 per entry rather than a tuple each."""

    def __init__(self, values: array) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values) // 2

    def __getitem__(self, i: int) -> tuple[int, int]:
        i = range(len(self))[i]  # IndexError past the end, as a sequence must
        return self._values[2 * i], self._values[2 * i + 1]


def _parse_files(reader: JsonPieces) -> tuple[list[str], _Stats]:
    """The ``files`` list, ``[[relative path, size, mtime_ns], ...]``, one entry at a time."""
    names: list[str] = []
    values = array("q")
    for _ in reader.items():
        if len(names) >= MAX_INDEX_FILES:
            raise ValueError(f"more than {MAX_INDEX_FILES:,} files")
        entry = []
        for _ in reader.items():
            if len(entry) == 3:
                raise ValueError("an entry of 'files' with more than 3 items")
            entry.append(reader.value())
        if len(entry) != 3 or not _relative_name(entry[0]) or not all(type(v) is int and -(1 << 63) <= v < 1 << 63
                                                                        for v in entry[1:]):  # int64, for the array
            raise ValueError("'files' must be a list of [relative path, size, mtime_ns]")
        names.append(entry[0])
        values.extend(entry[1:])
    return names, _Stats(values)


def _parse_record(text: str) -> tuple[dict, list[str], _Stats]:
    """The index record's fields (all but ``files``), and its files with their stats."""
    reader, fields, files = JsonPieces(text), {}, None
    for key in reader.keys():
        if key in fields or (key == "files" and files is not None):
            raise ValueError(f"the key {key!r} appears twice")
        if key == "files":
            files = _parse_files(reader)
        else:
            fields[key] = reader.value()
    reader.end()
    if files is None:
        raise ValueError("no 'files'")
    return fields, *files


def load_index(path: str | os.PathLike) -> ImageIndex:
    """Reads an index written by :func:`build_index`; raises :class:`IndexFileError` for one that is missing, a FIFO
    or device, or not a vlm index (naming the reason). At most :data:`MAX_INDEX_FILES` files and a
    :data:`MAX_HEADER`-byte header, the record read one entry at a time (:class:`~vlm.data.jsonpieces.JsonPieces`);
    the embeddings must be F32 ``[files, embed_dim]`` filling the rest of the file before they are read.
    """
    def bad(why: str) -> IndexFileError:
        return IndexFileError(f"{path} is not a vlm image index: {why}")

    try:
        check_regular(path, "index")
        f = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")  # noqa: SIM115 - closed below
    except UnsafeFileError as e:
        raise IndexFileError(str(e)) from None
    except OSError as e:
        raise IndexFileError(f"cannot read index {path}: {e.strerror or e}") from None
    with f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise IndexFileError(f"index {path} is not a regular file")
        try:
            entries, metadata, start = read_safetensors_header(f, info.st_size, MAX_HEADER)
            if META_KEY not in metadata:
                raise ValueError(f"no {META_KEY!r} record in its metadata")
            if set(entries) != {"embeddings"} or not isinstance(entries["embeddings"], dict):
                raise ValueError(f"expected one tensor, 'embeddings'; found {sorted(entries)}")
        except ValueError as e:
            raise bad(str(e)) from None
        entry, text = entries["embeddings"], metadata.pop(META_KEY)
        try:
            record, files, stats = _parse_record(text)
        except (ValueError, RecursionError) as e:  # malformed, nested without end, too many files
            raise bad(f"a malformed {META_KEY!r} record ({e})") from None
        del text
        if record.get("format") != FORMAT:
            raise bad(f"no {META_KEY!r} record in its metadata")
        if record.get("version") != VERSION:
            raise bad(f"format version {record.get('version')!r}, this vlm reads version {VERSION}")
        fields = {k: record.get(k) for k in ("root", "checkpoint", "fingerprint")}
        dim = record.get("embed_dim")
        if not all(isinstance(v, str) and v for v in fields.values()) or not os.path.isabs(fields["root"]):
            raise bad("'root', 'checkpoint' and 'fingerprint' must be strings, 'root' an absolute path")
        if type(dim) is not int or not 1 <= dim <= MAX_EMBED_DIM:
            raise bad(f"'embed_dim' must be an integer from 1 to {MAX_EMBED_DIM:,}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        nbytes = len(files) * dim * 4
        if dtype != "F32" or shape != [len(files), dim]:
            raise bad(f"'embeddings' is {dtype} {shape}, expected F32 [{len(files)}, {dim}]")
        if offsets != [0, nbytes] or info.st_size != start + nbytes:
            raise bad(f"'embeddings' should be the {nbytes:,} bytes after the header; the file holds "
                      f"{info.st_size - start:,} there and the header says {offsets}")
        embeddings = torch.empty(len(files), dim, dtype=torch.float32)
        if nbytes and f.readinto(memoryview(embeddings.numpy()).cast("B")) != nbytes:
            raise bad("the file is shorter than its header says")
    return ImageIndex(Path(fields["root"]), files, stats, embeddings, fields["checkpoint"], fields["fingerprint"])


def list_images(root: Path, skip: Callable[[str, str], None]) -> list[str]:
    """The image files under ``root`` (recursively, by name; linked folders are not followed), as sorted relative
    POSIX paths. A sub-folder that cannot be listed is passed to ``skip`` (its relative path and the reason)."""

    def unlistable(e: OSError) -> None:
        skip(Path(e.filename).relative_to(root).as_posix() + "/", f"cannot list folder ({e.strerror or e})")

    found = []
    for folder, _, names in os.walk(root, onerror=unlistable):
        found += [(Path(folder) / n).relative_to(root).as_posix() for n in names if
                  PurePath(n).suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    return sorted(found)


def load_clip(checkpoint: str | os.PathLike, batch_size: int = 64) -> CLIPPredictor:
    """``vlm.load(checkpoint)``; raises :class:`~vlm.formats.CheckpointError` for a missing, refused or non-CLIP
    checkpoint (search needs text embeddings)."""
    predictor = load(checkpoint, batch_size=batch_size)
    if not isinstance(predictor, CLIPPredictor):
        raise CheckpointError(f"{checkpoint} is a {predictor.kind}: image search needs a CLIP checkpoint")
    return predictor


def build_index(checkpoint: str | os.PathLike, images_dir: str | os.PathLike, out: str | os.PathLike,
                batch_size: int = 64, progress: bool = True, rebuild: bool = False,
                workers: int | None = None) -> IndexReport:
    """Embeds the images under ``images_dir`` (recursively, :data:`vlm.inputs.IMAGE_SUFFIXES`) with the CLIP model of
    ``checkpoint`` into the index ``out``. An existing index is updated: only new images and those whose size or
    ``mtime_ns`` changed are embedded, removed ones dropped; with ``rebuild`` it is replaced whatever built it. Images
    that cannot be read get one stderr line each and are left out. ``progress``: a bar when stderr is a terminal.
    ``workers``: processes decoding ahead of the model (0: in this process; None:
    :func:`vlm.data.prefetch.default_workers` for the images to embed); the index is the same either way.

    Raises:
        IndexFileError: ``out`` is not a vlm index, or was built with another checkpoint (and ``rebuild`` is off).
        ValueError: a missing, refused or non-CLIP checkpoint (CheckpointError), no folder, no readable image.
        OSError: ``out`` cannot be written.
    """
    root, out = Path(os.path.abspath(images_dir)), Path(out)
    if not root.is_dir():
        raise ValueError(f"images folder {images_dir} is not a folder")
    mark = fingerprint(checkpoint)  # before the model is loaded: a mismatch is refused at once
    old = None
    if not rebuild and os.path.lexists(out):
        try:
            old = load_index(out)
        except IndexFileError as e:
            raise IndexFileError(f"{e}; pass --rebuild to replace it") from None
        if old.fingerprint != mark:
            raise IndexFileError(f"{out} was built with another checkpoint ({old.checkpoint}, {old.fingerprint[:19]}"
                                 f"...) than {checkpoint} ({mark[:19]}...); pass --rebuild to re-embed every image")
    predictor = load_clip(checkpoint, batch_size)
    failed: dict[str, str] = {}

    def skip(name: str, reason: str) -> None:  # one line each, as they come (above the progress bar)
        failed[name] = reason
        tqdm.write(printable(f"vlm index: skipped {root / name}: {reason}"), file=sys.stderr)

    names = list_images(root, skip)
    if not names:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    reusable = ({name: (stat, row) for row, (name, stat) in enumerate(zip(old.files, old.stats))}
                if old is not None and old.root == root else {})  # another folder's relative names are other files
    stats: dict[str, tuple[int, int]] = {}
    for name in names:
        try:
            info = os.stat(root / name)  # before reading: a file changed meanwhile is re-embedded next time
            stats[name] = (info.st_size, info.st_mtime_ns)
        except OSError as e:
            skip(name, f"cannot read ({e.strerror or e})")
    todo = [n for n in stats if reusable.get(n, (None,))[0] != stats[n]]
    new: dict[str, Tensor] = {}
    show = progress and len(todo) > batch_size and sys.stderr.isatty()
    with tqdm(total=len(todo), disable=not show, unit="img", desc="vlm index", file=sys.stderr) as bar:
        workers = default_workers(len(todo)) if workers is None else workers
        for done, embedded in embed_files(predictor, root, todo, skip, batch_size, workers):
            new.update(embedded)
            bar.update(done)
    kept = [n for n in stats if n in new or reusable.get(n, (None,))[0] == stats[n]]  # embedded now, or unchanged
    if not kept:
        raise ValueError(f"none of the {len(names)} images under {root} could be read")
    if len(kept) > MAX_INDEX_FILES:
        raise ValueError(f"{len(kept):,} images under {root}: an index holds at most {MAX_INDEX_FILES:,}")
    rows = [new[n] if n in new else old.embeddings[reusable[n][1]] for n in kept]
    index = ImageIndex(root, kept, [stats[n] for n in kept], torch.stack(rows), os.path.abspath(checkpoint), mark)
    _write_index(index, out)
    removed = len(set(old.files) - set(kept)) if old is not None else 0
    return IndexReport(len(kept), len(new), len(kept) - len(new), removed, failed)


def embed_files(predictor: CLIPPredictor, root: Path, names: Sequence[str], skip: Callable[[str, str], None],
                batch_size: int, workers: int = 0) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Embeds the images ``root / name``, ``batch_size`` at a time: yields the number of names handled and the
    embeddings (float32, CPU) of those that loaded; one that cannot be read goes to ``skip`` with the reason. Each
    image is decoded alone and cut to the model's size at once (the same resize and crop ``embed_images`` applies,
    which then leaves it as it is), so a batch holds small uint8 tensors, never decoded full-size pictures. With
    ``workers``, worker processes decode ahead of the model (:func:`vlm.data.prefetch.model_inputs`: bounded, in
    order, the same bytes, so the same embeddings)."""
    inputs = model_inputs([root / name for name in names], predictor.image_size, workers)
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        pixels, ok = [], []
        for name, (_, image, reason) in zip(chunk, inputs):
            if reason is None:
                pixels.append(image)
                ok.append(name)
            else:
                skip(name, reason)
        yield len(chunk), dict(zip(ok, predictor.embed_images(pixels).float().cpu())) if pixels else {}


def search(index: ImageIndex, predictor: CLIPPredictor, query: str, top_k: int = 10) -> list[tuple[Path, float]]:
    """The ``top_k`` images of ``index`` most similar to the text ``query``, best first, with their cosine scores.
    Raises ``ValueError`` for an empty query or a model whose embedding width is not the index's."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query is empty")
    text = predictor.embed_texts([query])[0].float().cpu()
    if text.shape[0] != index.embeddings.shape[1]:
        raise ValueError(f"the model embeds into {text.shape[0]} dimensions, the index {index.embeddings.shape[1]}")
    top = (index.embeddings @ text).topk(max(0, min(top_k, len(index.files))))
    return [(index.root / index.files[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]


def _say(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)


def read_captions(images_dir: Path, warn: Callable[[str], None] = _say,
                  labels: dict[str, list[str | None]] | None = None) -> Captions:
    """Captions by relative image path from ``images_dir/metadata.jsonl`` (rows with ``file_name`` and ``captions``,
    a list, or ``caption``; rows naming the same file add captions, up to :data:`MAX_CAPTIONS_PER_IMAGE`), in
    first-seen order. The file is read one line at a time (:func:`vlm.data.records.read_json_rows`) and only rows
    naming an existing file are kept, so memory follows the folder, not the file. A line that is not such a row costs
    only itself: one ``warn`` call for the whole file names the first one. A ``labels`` dict is filled with each
    image's caption labels, in its captions' order: the row's ``label`` (a non-blank string) or None.
    Raises :class:`~vlm.data.files.UnsafeFileError` for a missing metadata file, or one that is a FIFO, device or too
    large.
    """
    meta = images_dir / METADATA_FILE
    captions = Captions()

    def keep(row: dict) -> int | Skip:
        texts = row["captions"] if "captions" in row else [row.get("caption")]
        texts = [t for t in texts if isinstance(t, str) and t.strip()] if isinstance(texts, list) else []
        name = row.get("file_name")
        if not _relative_name(name):
            return Skip("file_name is not a relative path inside the folder")
        if not texts:
            return Skip("no caption (a non-blank 'caption' string or a 'captions' list of strings)")
        name = PurePath(name).as_posix()
        if name not in captions and not os.path.lexists(images_dir / name):
            return Skip(f"no image file {name!r}")
        left = captions.add(name, [t.replace("\x00", " ") for t in texts])
        if labels is not None:
            label = row.get("label")
            label = label.replace("\x00", " ") if isinstance(label, str) and label.strip() else None
            labels.setdefault(name, []).extend([label] * (len(texts) - left))
        return left

    dropped = sum(read_json_rows(meta, keep, lambda m: warn(f"warning: {m}"), limit=METADATA_LIMIT))
    if dropped:
        warn(f"warning: {meta}: left out {dropped:,} captions beyond {MAX_CAPTIONS_PER_IMAGE} per image")
    return captions
