"""Image search over a folder with a CLIP checkpoint (``vlm index``, ``vlm search``), and retrieval recall with
several captions per image (``vlm retrieval``); the commands themselves are in :mod:`vlm.cli`.

The index is one safetensors file: ``embeddings`` (float32, (n, embed_dim), unit length) and, in the header's
metadata, a JSON record: the images folder, each image's relative path with its size and ``mtime_ns``, the
checkpoint's path and SHA-256 fingerprint, the embedding width. Nothing is pickled; the file is replaced atomically.
A re-run embeds only new or changed images and drops removed ones; an index of another checkpoint is refused.

Exit codes: 0 done, 1 some image could not be read (one stderr line each; the rest are used), 2 usage error (bad
arguments, a missing, refused or mismatched checkpoint or index; one ``vlm <command>: error:`` line).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from vlm.data.files import METADATA_LIMIT, UnsafeFileError, check_regular, read_text_bounded
from vlm.formats import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from vlm.inference import CLIPPredictor, load
from vlm.inputs import IMAGE_SUFFIXES, METADATA_FILE, load_batches, printable
from vlm.metrics import multi_caption_recall

FORMAT, VERSION, META_KEY = "vlm-image-index", 1, "vlm_index"
MAX_TOP_K, MAX_BATCH_SIZE, MAX_EMBED_DIM = 1000, 4096, 1 << 16
RECALL_KS = (1, 5, 10)


class IndexFileError(ValueError):
    """An index that is missing, not a vlm index, or built with another checkpoint; the message names the file."""


@dataclass
class ImageIndex:
    """A loaded index: row i of ``embeddings`` (n, embed_dim) is ``files[i]``, a path relative to ``root``, whose
    size and ``mtime_ns`` were ``stats[i]`` when it was embedded with the checkpoint of that ``fingerprint``."""

    root: Path
    files: list[str]
    stats: list[tuple[int, int]]
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


@dataclass
class RetrievalReport:
    """:func:`retrieval_eval`'s recalls (``image_to_text_R@k``, ``text_to_image_R@k``), counts and skipped images."""

    metrics: dict[str, float]
    images: int
    captions: int
    failed: dict[str, str]


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


def load_index(path: str | os.PathLike) -> ImageIndex:
    """Reads an index written by :func:`build_index`, its header checked before the embeddings are read; raises
    :class:`IndexFileError` for one that is missing, a FIFO or device, or not a vlm index (naming the reason)."""
    def bad(why: str) -> IndexFileError:
        return IndexFileError(f"{path} is not a vlm image index: {why}")

    try:
        check_regular(path, "index")
        handle = safe_open(str(path), framework="pt")
    except UnsafeFileError as e:
        raise IndexFileError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - safetensors' errors: a bad header, a truncated file
        raise bad(f"not a safetensors file ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    with handle as f:
        try:
            record = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        except (ValueError, RecursionError):  # malformed, or nested without end
            record = None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise bad(f"no {META_KEY!r} record in its metadata")
        if record.get("version") != VERSION:
            raise bad(f"format version {record.get('version')!r}, this vlm reads version {VERSION}")
        files, dim = record.get("files"), record.get("embed_dim")
        if not isinstance(files, list) or not all(isinstance(r, list) and len(r) == 3 and _relative_name(r[0])
                                                  and all(type(v) is int for v in r[1:]) for r in files):  # fmt: skip
            raise bad("'files' must be a list of [relative path, size, mtime_ns]")
        text = {k: record.get(k) for k in ("root", "checkpoint", "fingerprint")}
        if not all(isinstance(v, str) and v for v in text.values()) or not os.path.isabs(text["root"]):
            raise bad("'root', 'checkpoint' and 'fingerprint' must be strings, 'root' an absolute path")
        if type(dim) is not int or not 1 <= dim <= MAX_EMBED_DIM:
            raise bad(f"'embed_dim' must be an integer from 1 to {MAX_EMBED_DIM:,}")
        if set(f.keys()) != {"embeddings"}:
            raise bad(f"expected one tensor, 'embeddings'; found {sorted(f.keys())}")
        part = f.get_slice("embeddings")
        if part.get_dtype() != "F32" or list(part.get_shape()) != [len(files), dim]:
            raise bad(f"'embeddings' is {part.get_dtype()} {part.get_shape()}, expected F32 [{len(files)}, {dim}]")
        embeddings = f.get_tensor("embeddings")
    return ImageIndex(Path(text["root"]), [r[0] for r in files], [(r[1], r[2]) for r in files], embeddings,
                      text["checkpoint"], text["fingerprint"])  # fmt: skip


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
                batch_size: int = 64, progress: bool = True, rebuild: bool = False) -> IndexReport:
    """Embeds the images under ``images_dir`` (recursively, :data:`vlm.inputs.IMAGE_SUFFIXES`) with the CLIP model of
    ``checkpoint`` into the index ``out``. An existing index is updated: only new images and those whose size or
    ``mtime_ns`` changed are embedded, removed ones dropped; with ``rebuild`` it is replaced whatever built it. Images
    that cannot be read get one stderr line each and are left out. ``progress``: a bar when stderr is a terminal.

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
        for batch in load_batches([root / n for n in todo], batch_size):
            for path, reason in batch.errors.items():
                skip(path.relative_to(root).as_posix(), reason)
            if batch.images:
                rows = predictor.embed_images(batch.images).float().cpu()
                new.update((p.relative_to(root).as_posix(), row) for p, row in zip(batch.ok_paths, rows))
            bar.update(len(batch.paths))
    kept = [n for n in stats if n in new or reusable.get(n, (None,))[0] == stats[n]]  # embedded now, or unchanged
    if not kept:
        raise ValueError(f"none of the {len(names)} images under {root} could be read")
    rows = [new[n] if n in new else old.embeddings[reusable[n][1]] for n in kept]
    index = ImageIndex(root, kept, [stats[n] for n in kept], torch.stack(rows), os.path.abspath(checkpoint), mark)
    _write_index(index, out)
    removed = len(set(old.files) - set(kept)) if old is not None else 0
    return IndexReport(len(kept), len(new), len(kept) - len(new), removed, failed)


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


def read_captions(images_dir: Path, warn: Callable[[str], None] = _say) -> dict[str, list[str]]:
    """Captions by relative image path from ``images_dir/metadata.jsonl`` (rows with ``file_name`` and ``captions``,
    a list, or ``caption``; rows naming the same file add captions), in first-seen order. A line that is not such a
    row costs only itself: one ``warn`` call for the whole file names the first one. Raises
    :class:`~vlm.data.files.UnsafeFileError` for a missing metadata file, or one that is a FIFO, device or too large.
    """
    meta = images_dir / METADATA_FILE
    text = read_text_bounded(meta, "metadata file", limit=METADATA_LIMIT)
    captions: dict[str, list[str]] = {}
    skipped, first = 0, ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row, reason = json.loads(line), "not a JSON object"
        except (ValueError, RecursionError) as e:
            row, reason = None, f"not JSON ({type(e).__name__})"
        if isinstance(row, dict):
            texts = row["captions"] if "captions" in row else [row.get("caption")]
            texts = [t for t in texts if isinstance(t, str) and t.strip()] if isinstance(texts, list) else []
            if not _relative_name(row.get("file_name")):
                reason = "file_name is not a relative path inside the folder"
            elif not texts:
                reason = "no caption (a non-blank 'caption' string or a 'captions' list of strings)"
            else:
                captions.setdefault(PurePath(row["file_name"]).as_posix(), []).extend(texts)
                continue
        skipped += 1
        first = first or f"line {number}: {reason}"
    if skipped:
        warn(f"warning: {meta}: skipped {skipped} malformed line{'s' if skipped > 1 else ''} (first: {first})")
    return captions


def retrieval_eval(predictor: CLIPPredictor, images_dir: str | os.PathLike, ks: Sequence[int] = RECALL_KS,
                   warn: Callable[[str], None] = _say) -> RetrievalReport:
    """Image->text and text->image recall@k (:func:`vlm.metrics.multi_caption_recall`) over a folder whose
    ``metadata.jsonl`` gives each image its captions (:func:`read_captions`). An image that cannot be read is
    reported through ``warn`` and left out with its captions. Raises ``ValueError`` (``UnsafeFileError`` included)
    for a missing or unusable metadata file, or no readable image in it."""
    root = Path(images_dir)
    captions = read_captions(root, warn)
    if not captions:
        raise ValueError(f"{root / METADATA_FILE} gives no image a caption")
    failed: dict[str, str] = {}
    ok, parts = [], []  # readable images, their embeddings batch by batch
    for batch in load_batches([root / n for n in captions], predictor.batch_size):
        for path, reason in batch.errors.items():
            failed[path.relative_to(root).as_posix()] = reason
            warn(f"vlm retrieval: skipped {path}: {reason}")
        if batch.images:
            parts.append(predictor.embed_images(batch.images))
            ok += [p.relative_to(root).as_posix() for p in batch.ok_paths]
    if not ok:
        raise ValueError(f"none of the {len(captions)} images named in {root / METADATA_FILE} could be read")
    texts = [t for name in ok for t in captions[name]]
    owner = torch.tensor([i for i, name in enumerate(ok) for _ in captions[name]], device=predictor.device)
    metrics = multi_caption_recall(torch.cat(parts), predictor.embed_texts(texts), owner, ks)
    return RetrievalReport(metrics, len(ok), len(texts), failed)
