"""Input handling shared by the command-line scripts: expanding paths, loading images in batches, error records,
printing untrusted text, the argument bounds and output lines of the Flamingo scripts (``caption.py``,
``answer.py``).

A bad input never stops the others: each yields either a tensor or an error message, and the script prints one
line for it. Nothing here opens a path while listing: a FIFO or device among the inputs is only ever ``stat``-ed,
and refused by :func:`vlm.data.images.load_image` with its own error line.

torch is imported only where images are cut to a model's input, so the scripts can validate their arguments (and
print usage errors) without paying for the import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from vlm.data.files import METADATA_LIMIT, UnsafeFileError, read_text_bounded

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
METADATA_FILE = "metadata.jsonl"

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Bounds of the Flamingo scripts' arguments (larger values are usage errors)
MAX_NEW_TOKENS = 1024
MAX_BEAMS = 64
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 64  # vlm.data.prefetch.MAX_WORKERS (not imported: it imports torch)
MAX_PROMPT_CHARS = 10_000  # a prompt, question or example text; the decoder's context is far shorter anyway
MAX_EXAMPLES = 32  # each example is an image per input: a batch holds (examples + 1) x batch-size images


def printable(text: str | os.PathLike | bytes) -> str:
    """``text`` with every non-printable character escaped, so it prints as exactly one visible line.

    Newlines, carriage returns and tabs become ``\\n``, ``\\r``, ``\\t``; other control and format characters (ANSI
    escapes, Unicode line separators, bidirectional overrides) become ``\\xhh`` / ``\\uhhhh`` / ``\\Uhhhhhhhh``, as in
    ``repr`` without the quotes. Bytes that are not UTF-8 (carried in a ``str`` by ``surrogateescape``, as file
    names are) become ``\\xhh``. Backslashes are kept as they are: the text form is for reading (a file name cannot
    forge an output line or a terminal escape); the exact name is in the ``--json`` output.

    Args:
        text: a string (possibly holding surrogate-escaped bytes), a path, or bytes (decoded as file names are).
    """
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text.isprintable():  # the common case: nothing to escape
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode carries it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def usage_error(message: str) -> int:
    """Prints one ``error:`` line on stderr, escaped (it may quote a path, a template or a prompt); returns 2, the
    usage-error exit status."""
    print(f"error: {printable(message)}", file=sys.stderr)
    return 2


def emit(as_json: bool, record: dict, text: str) -> None:
    """Prints one output line: ``record`` as JSON, or ``text`` (already escaped with :func:`printable`)."""
    print(json.dumps(record) if as_json else text, flush=True)


def check_generation_args(args: argparse.Namespace, example: str, example_texts: Sequence[str]) -> None:
    """The bounds the Flamingo scripts share: ``--num-beams``, ``--batch-size``, ``--workers``, ``--max-new-tokens``
    and ``--example`` (at most :data:`MAX_EXAMPLES`, each text after the image at most :data:`MAX_PROMPT_CHARS`).

    Args:
        args: the parsed arguments.
        example: what one ``--example`` is called in messages (``"pair"``).
        example_texts: what each of its texts after the image is called (``["caption"]``).

    Raises:
        SystemExit: status 2 after one ``error:`` line, for the first value out of bounds.
    """
    for name, most in (("num_beams", MAX_BEAMS), ("batch_size", MAX_BATCH_SIZE)):
        if not 1 <= getattr(args, name) <= most:
            raise SystemExit(usage_error(f"--{name.replace('_', '-')} must be between 1 and {most:,}"))
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        raise SystemExit(usage_error(f"--workers must be between 0 and {MAX_WORKERS}"))
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise SystemExit(usage_error(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS:,}"))
    if len(args.example) > MAX_EXAMPLES:
        raise SystemExit(usage_error(f"{len(args.example)} --example {example}s: at most {MAX_EXAMPLES}"))
    for given in args.example:
        for what, text in zip(example_texts, given[1:]):
            if len(text) > MAX_PROMPT_CHARS:
                raise SystemExit(usage_error(f"an --example {what} is {len(text):,} characters long: at most "
                                             f"{MAX_PROMPT_CHARS:,}"))


def expand_paths(paths: Sequence[str], errors: dict[Path, str] | None = None) -> list[Path]:
    """Folders become their image files in sorted order (non-recursive); other paths are kept as given, so a
    missing, unreadable or special one (a FIFO, a device) still gets its own error line later.

    Listing a folder reads only its entries' names: no entry is opened or even ``stat``-ed here, so a FIFO named
    ``x.png`` is passed on (and refused by the loader) rather than read.

    Args:
        paths: the paths given on the command line.
        errors: where a folder that cannot be listed gets its reason; the folder itself is then kept in the
            returned list, so it takes its place in the output with that error. Without it, such a folder is kept
            and the loader reports it as a directory.
    """
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        try:
            is_dir = path.is_dir()  # stat only: a FIFO or device given directly is not opened
        except (OSError, ValueError):  # a name too long, a parent not searchable: the loader's error line says so
            is_dir = False
        if is_dir:
            try:
                files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as e:  # permission denied, removed meanwhile, ...
                out.append(path)
                if errors is not None:
                    errors[path] = f"cannot list folder ({e.strerror or e})"
                continue
            out.extend(files)
        else:
            out.append(path)
    return out


def _warn_stderr(message: str) -> None:
    print(f"warning: {printable(message)}", file=sys.stderr, flush=True)


def _row_path(folder: Path, file_name: object) -> tuple[Path | None, str]:
    """The image a metadata row names, or None and why the row is unusable.

    Only a relative name inside ``folder`` is accepted: an absolute name or one with ``..`` would let a folder's
    metadata label another folder's images. Rows are only ever looked up by the paths being processed; nothing is
    read from the names they hold.
    """
    if not isinstance(file_name, str):
        return None, "file_name is not a string" if file_name is not None else "no file_name"
    pure = PurePath(file_name)
    if not file_name or pure.is_absolute() or ".." in pure.parts or "\x00" in file_name:
        return None, "file_name is not a relative path inside the folder"
    return folder / pure, ""


METADATA_FIELDS = ("label", "caption", "captions", "heldout")  # what the scripts read of a row


def _metadata_rows(meta: Path, warn: Callable[[str], None], wanted: set[Path] | None,
                   shape: Callable[[dict], dict | Any | None], lost: str) -> list[tuple[Path, dict]]:
    """(image path, ``shape(row)``) for the usable rows of one ``metadata.jsonl`` (of ``wanted`` paths, when given);
    ``shape`` returns what is kept of a row, a :class:`vlm.data.records.Skip` for a malformed one, or None to pass
    over it silently. A file that cannot be read (or grows past its limit while being read) gives no rows and one
    ``warn`` call saying its ``lost`` are not used."""
    from vlm.data.records import Skip, read_json_rows

    def keep(row: dict) -> tuple[Path, dict] | Skip | None:
        path, reason = _row_path(meta.parent, row.get("file_name"))
        if path is None:
            return Skip(reason)
        if wanted is not None and path not in wanted:
            return None
        kept = shape(row)
        return kept if kept is None or isinstance(kept, Skip) else (path, kept)

    try:
        return [item for item in read_json_rows(meta, keep, warn, limit=METADATA_LIMIT) if item is not None]
    except UnsafeFileError as e:
        warn(f"{e}; its {lost} are not used")
        return []


def read_metadata(meta: Path, warn: Callable[[str], None] = _warn_stderr,
                  wanted: set[Path] | None = None) -> dict[Path, dict]:
    """The usable rows of one ``metadata.jsonl``, by the path of the image each names, holding only
    :data:`METADATA_FIELDS` (and only the rows of ``wanted`` paths, when given).

    The file is read one line at a time (:func:`vlm.data.records.read_json_rows`: regular files only, at most
    :data:`vlm.data.files.METADATA_LIMIT` bytes, long lines skipped unread), so memory follows the rows kept, not the
    file. A line that is not a JSON object with a string ``file_name`` naming a file inside the folder is skipped;
    the skipped lines (or an unreadable file) get one ``warn`` call for the whole file, never one per line.
    """
    def shape(row: dict) -> dict:
        return {k: row[k] for k in METADATA_FIELDS if k in row}

    return dict(_metadata_rows(meta, warn, wanted, shape, "labels and captions"))


def read_questions(meta: Path, warn: Callable[[str], None] = _warn_stderr,
                   wanted: set[Path] | None = None) -> dict[Path, list[dict]]:
    """The question records of one ``metadata.jsonl`` (docs/vqa.md; several rows may name one image), by image path,
    in file order: each ``{"question", "answers", "heldout"}``.

    ``question`` has its runs of white space made one space, as training reads it; ``answers`` are what it is scored
    against, read as :func:`vlm.data.vqa.question_table` reads them (``answers`` where the row has a list, else
    ``[answer]``; ``[]`` for a question without an answer); ``heldout`` is the row's flag or None. Rows without a
    ``question`` field (captions) are passed over; one whose question is not a non-blank string is malformed. The
    file is read as :func:`read_metadata` reads it.
    """
    from vlm.data.records import Skip
    from vlm.data.vqa import ANSWER_COLUMN, ANSWERS_COLUMN, HELDOUT_COLUMN, QUESTION_COLUMN, parse_answers

    def shape(row: dict) -> dict | Skip | None:
        if QUESTION_COLUMN not in row:
            return None
        question = row[QUESTION_COLUMN]
        if not isinstance(question, str) or not question.strip():
            return Skip("question is not a non-blank string")
        one = row.get(ANSWER_COLUMN)
        one = str(one).strip() if one is not None else ""
        answers = parse_answers(row.get(ANSWERS_COLUMN)) or ([one] if one else [])
        return {"question": " ".join(question.split()), "answers": answers, "heldout": row.get(HELDOUT_COLUMN)}

    rows: dict[Path, list[dict]] = {}
    for path, row in _metadata_rows(meta, warn, wanted, shape, "questions"):
        rows.setdefault(path, []).append(row)
    return rows


def folder_metadata(paths: Sequence[Path], warn: Callable[[str], None] = _warn_stderr) -> dict[Path, dict]:
    """Rows of the ``metadata.jsonl`` files (Hugging Face imagefolder layout) next to the given images, by path.

    A bad metadata file or line costs only its rows (see :func:`read_metadata`): the images are processed anyway.

    Args:
        paths: the images being processed.
        warn: called with one message per metadata file that was unreadable or had malformed lines (default:
            a ``warning:`` line on stderr).
    """
    rows: dict[Path, dict] = {}
    for meta, wanted in _metadata_files(paths):
        rows.update(read_metadata(meta, warn, wanted))
    return rows


def folder_questions(paths: Sequence[Path], warn: Callable[[str], None] = _warn_stderr) -> dict[Path, list[dict]]:
    """The question records (:func:`read_questions`) of the ``metadata.jsonl`` files next to the given images, by
    path; a bad metadata file or line costs only its rows, as in :func:`folder_metadata`."""
    rows: dict[Path, list[dict]] = {}
    for meta, wanted in _metadata_files(paths):
        rows.update(read_questions(meta, warn, wanted))
    return rows


def _metadata_files(paths: Sequence[Path]) -> Iterator[tuple[Path, set[Path]]]:
    """Each ``metadata.jsonl`` beside the given images, with the images of its folder."""
    for folder in sorted({p.parent for p in paths}):
        meta = folder / METADATA_FILE
        if os.path.lexists(meta):  # lexists: a dangling link or a FIFO is reported, not silently ignored
            yield meta, {p for p in paths if p.parent == folder}


def read_labels(inline: str | None, path: str | None) -> list[str]:
    """Class names from a comma-separated string or a file; blank, duplicate or missing ones are usage errors.

    The file must be a regular UTF-8 file of at most :data:`vlm.data.files.TEXT_LIMIT` bytes: a FIFO or device
    would block or never end, a huge file would be read whole.
    """
    if path is not None:
        raw = read_text_bounded(path, "labels file").splitlines()  # UnsafeFileError is a ValueError
        raw = [line for line in raw if line.strip()]
    else:
        raw = inline.split(",")
    labels = [label.strip() for label in raw]
    if not labels or not any(labels):
        raise ValueError("no labels given: pass at least one non-blank class name")
    blank = [i + 1 for i, label in enumerate(labels) if not label]
    if blank:
        raise ValueError(f"label number {blank[0]} is blank")
    seen: set[str] = set()
    dupes = {label for label in labels if label in seen or seen.add(label)}  # one pass: a set, not a count per label
    if dupes:
        raise ValueError(f"duplicate label {min(dupes)!r}")
    return labels


MAX_BATCH_PIXELS = 1 << 26  # pixels a batch holds decoded (64 Mpx: 192 MiB as RGB); a batch ends early at it


@dataclass
class LoadedBatch:
    """A batch of inputs: ``images`` holds the ones that loaded, ``errors`` the message for each that did not.

    ``images`` are RGB ``PIL`` images, or, when :func:`load_batches` was given the model's ``image_size``, each
    image's model input geometry: a uint8 tensor (3, image_size, image_size), which a predictor takes as it takes
    the file (same results).
    """

    paths: list[Path]
    images: list[Any]  # one per path of ok_paths
    ok_paths: list[Path]
    errors: dict[Path, str]


def load_batches(
    paths: Sequence[Path],
    batch_size: int = 32,
    known_errors: Mapping[Path, str] | None = None,
    image_size: int | None = None,
    workers: int = 0,
) -> Iterator[LoadedBatch]:
    """Loads images ``batch_size`` at a time with :func:`vlm.data.images.load_image`; a file that fails gets the
    reason in ``errors`` instead, as does a path in ``known_errors`` (e.g. a folder that :func:`expand_paths` could
    not list), which is not loaded.

    Images are decoded one at a time, each within :func:`~vlm.data.images.load_image`'s pixel budget. With
    ``image_size``, each is cut to the model's input geometry (:func:`vlm.data.transforms.eval_geometry`: shorter
    side resized, centre crop) as soon as it is decoded, so a batch holds ``batch_size`` small tensors and never
    the decoded images. Either way a batch ends early once the images it holds reach :data:`MAX_BATCH_PIXELS`.
    With ``workers`` (and ``image_size``), worker processes decode ahead of the caller
    (:func:`vlm.data.prefetch.model_inputs`: a bounded number of inputs in flight, the same bytes); the batches are
    the same as without them.

    Args:
        paths: the inputs, in order (a batch keeps that order).
        batch_size: the most inputs (loaded or not) in one batch.
        known_errors: inputs that are not loaded, with the reason each gets.
        image_size: the model's input side; ``None`` keeps the decoded RGB images.
        workers: decoding processes (:func:`vlm.data.prefetch.default_workers` picks a number); 0 decodes each
            image here when its turn comes.
    """
    from vlm.data.prefetch import model_inputs

    chunk: list[Path] = []
    images: list[Any] = []
    ok: list[Path] = []
    errors: dict[Path, str] = {}
    held = 0  # pixels of the images in this batch
    for path, image, reason in model_inputs(paths, image_size, workers, known_errors):
        chunk.append(path)
        if reason is not None:
            errors[path] = reason
        else:  # a cut input (the decoded image was dropped before the next was read), or a decoded PIL image
            held += image.shape[-1] * image.shape[-2] if image_size is not None else image.width * image.height
            images.append(image)
            ok.append(path)
        if len(chunk) >= batch_size or held >= MAX_BATCH_PIXELS:
            yield LoadedBatch(chunk, images, ok, errors)
            chunk, images, ok, errors, held = [], [], [], {}, 0
    if chunk:
        yield LoadedBatch(chunk, images, ok, errors)
