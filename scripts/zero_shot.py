"""Zero-shot classify images with a trained CLIP checkpoint.

    python scripts/zero_shot.py --checkpoint runs/clip/checkpoints/last.ckpt --labels "red circle,blue square" img.png
    python scripts/zero_shot.py --checkpoint CKPT --labels-file data/shapes/classnames.txt --json data/shapes/validation

A folder's images are processed in sorted order. If a folder holds a ``metadata.jsonl`` with a ``label`` column,
the accuracy over those images is reported at the end (a malformed line or file costs only its labels: one
``warning:`` line per file). An image with no such label whose folder is named after one of the labels (a class
sub-folder, ``red_circle/`` for ``red circle``) has that label as its truth.

Why it fails: with labels of two or more words, the report adds the accuracy per attribute, the words at each
position across the labels (``attribute 1 (red, blue)``: the colour right; ``attribute 2 (circle, square)``: the
shape right), and ``--confusion PATH`` writes the confusion matrix of the labelled images as a PNG. With ``--json
--accuracy-only`` the report is one JSON object: ``{"accuracy", "correct", "labelled", "attributes": [{"attribute",
"values", "correct", "total", "accuracy"}], ...}`` (plus ``heldout`` / ``seen`` objects with held-out labels).

Exit codes: 0 all inputs classified, 1 some input failed, 2 usage error (bad arguments, missing or wrong checkpoint,
a checkpoint or labels file that is a FIFO, device or too large, a ``--confusion`` path that cannot be written).

Output: one line per input, in input order. With ``--json`` each is an object ``{"path", "predictions": [{"label",
"prob"}]}`` or ``{"path", "error"}``; the path is exact (a file name that is not UTF-8 is written with
``surrogateescape``, so ``os.fsencode(record["path"])`` gives back its bytes). In text mode, control characters in
paths, labels and messages are escaped (``\\n``, ``\\x1b``...) so every input prints as one line.

Bounds: ``--top-k`` 1 to 1,000 (clipped to the number of labels), ``--batch-size`` 1 to 4,096; a template has one
plain ``{}`` and at most 1,000 characters; a labels file is a regular UTF-8 file of at most 16 MiB. An image of more
than 64 Mpx gets its error line (:func:`vlm.data.images.load_image`'s pixel budget); images are decoded one at a
time, and each is cut to the model's input size before the next is read. ``--workers N`` decodes in N processes ahead
of the model (a few batches in flight at most, the same output; default: none for a few images, else min(2, CPUs -
2)); ``--workers 0`` decodes in this process.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import printable, read_labels

MAX_TOP_K = 1000
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 64  # vlm.data.prefetch.MAX_WORKERS (not imported: it imports torch)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a vlm fit checkpoint (.ckpt) or a vlm export directory")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated class names")
    labels.add_argument("--labels-file", help="file with one class name per line")
    p.add_argument(
        "--templates",
        action="append",
        help="a template set (simple, openai, openai_simple, shapes, paraphrased) or a prompt with {} (repeatable); "
        "default: the templates the model was validated with",
    )
    p.add_argument("--template-pooling", choices=("mean", "marginal"), default=None,
                   help="how a label's prompts combine: mean (CLIP's ensemble) or marginal (summed over which prompt "
                   "fits the image); default: the model's")
    p.add_argument("--top-k", type=int, default=5, help="predictions per image, at most 1,000 (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch, at most 4,096")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding images ahead of the model, 0 to 64 (0: in this process; default: "
                   "none for a few images, else min(2, CPUs - 2))")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.add_argument("--accuracy-only", action="store_true", help="print only the accuracy over labelled images")
    p.add_argument("--heldout-labels-file", help="class names whose accuracy is also reported on its own")
    p.add_argument("--confusion", metavar="PATH", help="write the labelled images' confusion matrix as a PNG here")
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise SystemExit(error(f"--top-k must be between 1 and {MAX_TOP_K:,}"))
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise SystemExit(error(f"--batch-size must be between 1 and {MAX_BATCH_SIZE:,}"))
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        raise SystemExit(error(f"--workers must be between 0 and {MAX_WORKERS}"))
    try:
        if args.templates:  # checked before the checkpoint is loaded: a bad one is a usage error, not a crash later
            from vlm.zero_shot import get_templates

            args.templates = get_templates(args.templates)
        args.labels = read_labels(args.labels, args.labels_file)
        args.heldout = set(read_labels(None, args.heldout_labels_file)) if args.heldout_labels_file else set()
        if args.confusion:  # checked now, not after every image was classified
            check_output_path(args.confusion)
    except ValueError as e:  # UnsafeFileError included
        raise SystemExit(error(str(e))) from None
    return args


def check_output_path(path: str) -> None:
    """Refuses an output path whose folder does not exist or that names something other than a regular file (a
    FIFO would block the write, a directory cannot be written).

    Raises:
        ValueError: naming the path.
    """
    import os

    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"--confusion {path}: no such folder {folder}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"--confusion {path}: exists and is not a regular file")


def error(message: str) -> int:
    """Prints one ``error:`` line on stderr, escaped (it may quote a path, a template or a prompt); returns 2, the
    usage-error exit status."""
    print(f"error: {printable(message)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any loading: a FIFO or device would block or never end
        check_regular(args.checkpoint, "checkpoint", directory_ok=True)
    except UnsafeFileError as e:
        return error(str(e))
    # Heavy imports after argument parsing, so --help and usage errors are instant; vlm.load does not import
    # Lightning for a checkpoint that records its inference settings.
    from vlm.data.prefetch import default_workers
    from vlm.formats import CheckpointError
    from vlm.inference import CLIPPredictor, load
    from vlm.inputs import expand_paths, folder_metadata, load_batches

    try:
        model = load(args.checkpoint, batch_size=args.batch_size)
        if not isinstance(model, CLIPPredictor):
            raise CheckpointError(f"{args.checkpoint} is a {model.kind}: zero_shot.py needs a CLIP checkpoint")
        model.zero_shot_classifier(args.labels, args.templates, args.template_pooling)  # refused label/template: usage
    except (CheckpointError, ValueError) as e:
        return error(str(e))
    unlistable: dict = {}  # folders that could not be listed: one error line each
    paths = expand_paths(args.paths, unlistable)
    if not paths:
        return error("no images found in the given paths")
    # Labels that are not strings (a hand-edited file) are not ground truth: they would break the comparisons.
    truth = {p: row["label"] for p, row in folder_metadata(paths).items() if isinstance(row.get("label"), str)}
    truth = {**folder_truth(paths, args.labels), **truth}  # the metadata's label wins over the folder's name
    failed = 0
    pairs: list[tuple[str, str]] = []  # (predicted label, true label) for labelled images
    # each image is cut to the model's input as soon as it is decoded (in worker processes, ahead of the model, with
    # workers): a batch never holds decoded images
    workers = default_workers(len(paths)) if args.workers is None else args.workers
    for batch in load_batches(paths, args.batch_size, unlistable, model.image_size, workers):
        predictions = (model.classify(batch.images, args.labels, args.templates, args.top_k, args.template_pooling)
                       if batch.images else [])  # fmt: skip
        results = dict(zip(batch.ok_paths, predictions))
        for path in batch.paths:
            # JSON gets the exact name (str(path) carries non-UTF-8 bytes as surrogates, which json.dumps writes
            # as \udcXX escapes); text mode gets it escaped onto one line.
            exact, shown = str(path), printable(path)
            if path in batch.errors:
                failed += 1
                if not args.accuracy_only:
                    reason = batch.errors[path]
                    emit(args.json, {"path": exact, "error": reason}, f"{shown}: error: {printable(reason)}")
                continue
            preds = results[path]
            if path in truth:
                pairs.append((preds[0][0], truth[path]))
            if not args.accuracy_only:
                text = ", ".join(f"{printable(label)} ({prob:.3f})" for label, prob in preds)
                emit(
                    args.json,
                    {"path": exact, "predictions": [{"label": lb, "prob": round(pr, 6)} for lb, pr in preds]},
                    f"{shown}: {text}",
                )
    report_accuracy(pairs, args.labels, args.heldout, as_json=args.json and args.accuracy_only,
                    to_stderr=args.json and not args.accuracy_only)
    if args.confusion:
        try:
            write_confusion(pairs, args.labels, args.confusion)
        except (OSError, ValueError) as e:  # a folder that does not exist, a path that is a directory...
            return error(f"--confusion {args.confusion}: {e}")
    if failed:
        print(f"{failed} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def emit(as_json: bool, record: dict, text: str) -> None:
    """Prints one output line: ``record`` as JSON, or ``text`` (already escaped with :func:`printable`)."""
    print(json.dumps(record) if as_json else text, flush=True)


def folder_truth(paths: list, labels: list[str]) -> dict:
    """Truth from class sub-folders: each image whose folder's name, as a label (``red_circle`` -> ``red circle``,
    :func:`vlm.data.sources.folder_label`), is one of ``labels``."""
    from vlm.data.sources import folder_label

    known = set(labels)
    return {p: folder_label(p.parent.name) for p in paths if folder_label(p.parent.name) in known}


def report_accuracy(pairs: list[tuple[str, str]], labels: list[str], heldout: set[str], as_json: bool,
                    to_stderr: bool) -> None:
    """Prints top-1 accuracy over the labelled images, over the held-out and seen classes when held-out classes are
    given, and per attribute of multi-word labels (:func:`vlm.metrics.attribute_accuracy`).

    Args:
        pairs: ``(predicted label, true label)`` of each labelled image.
        labels: the label set (its words give the attributes).
        heldout: the held-out class names, or empty.
        as_json: one JSON object on stdout instead of text lines.
        to_stderr: text lines on stderr (stdout holding JSON records).
    """
    if not pairs:
        return
    from vlm.metrics import attribute_accuracy

    def score(subset: list[tuple[str, str]]) -> dict:
        correct = sum(p == t for p, t in subset)
        return {"accuracy": correct / len(subset), "correct": correct, "labelled": len(subset)}

    report = score(pairs)
    held = [(p, t) for p, t in pairs if t in heldout]
    seen = [(p, t) for p, t in pairs if t not in heldout]
    if held:
        report["heldout"] = score(held)
        if seen:
            report["seen"] = score(seen)
    report["attributes"] = attribute_accuracy(pairs, labels)
    if as_json:
        print(json.dumps(report), flush=True)
        return
    out = sys.stderr if to_stderr else sys.stdout
    print(f"zero-shot top-1 accuracy: {report['accuracy']:.4f} ({report['correct']}/{report['labelled']} labelled "
          "images)", file=out)
    for key, what in (("heldout", "held-out"), ("seen", "seen")):
        if key in report:
            part = report[key]
            print(f"zero-shot top-1 on {what} classes: {part['accuracy']:.4f} ({part['correct']}/{part['labelled']})",
                  file=out)
    for attribute in report["attributes"]:
        values = attribute["values"]
        shown = ", ".join(printable(v) for v in values[:4]) + (", ..." if len(values) > 4 else "")
        print(f"{attribute['attribute']} ({shown}) right: {attribute['accuracy']:.4f} "
              f"({attribute['correct']}/{attribute['total']})", file=out)


def write_confusion(pairs: list[tuple[str, str]], labels: list[str], path: str) -> None:
    """Writes the confusion matrix of ``pairs`` (rows: true label, columns: predicted) as a PNG at ``path``.

    The figure grows with the number of labels (about a quarter inch per label, 4 to 40 inches); cells hold their
    counts while there are at most 30 labels.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    from vlm.metrics import confusion_matrix

    matrix = confusion_matrix(pairs, labels)
    n = len(labels)
    side = min(40.0, max(4.0, 0.25 * n + 2.0))
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    try:
        ax.imshow(matrix, cmap="Blues", interpolation="nearest")
        names = [printable(label) for label in labels]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        correct = sum(matrix[i][i] for i in range(n))
        total = sum(map(sum, matrix))
        ax.set_title(f"zero-shot confusion: {correct}/{total} right")
        if n <= 30:
            peak = max(max(row) for row in matrix) or 1
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    if count:
                        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                                color="white" if count > peak / 2 else "black")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
