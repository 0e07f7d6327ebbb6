"""Zero-shot classify images with a trained CLIP checkpoint.

    python scripts/zero_shot.py --checkpoint runs/clip/checkpoints/last.ckpt --labels "red circle,blue square" img.png
    python scripts/zero_shot.py --checkpoint CKPT --labels-file data/shapes/classnames.txt --json data/shapes/validation

A folder's images are processed in sorted order. If a folder holds a ``metadata.jsonl`` with a ``label`` column,
the accuracy over those images is reported at the end (a malformed line or file costs only its labels: one
``warning:`` line per file). Exit codes: 0 all inputs classified, 1 some input failed, 2 usage error (bad arguments,
missing or wrong checkpoint, a checkpoint or labels file that is a FIFO, device or too large).

Output: one line per input, in input order. With ``--json`` each is an object ``{"path", "predictions": [{"label",
"prob"}]}`` or ``{"path", "error"}``; the path is exact (a file name that is not UTF-8 is written with
``surrogateescape``, so ``os.fsencode(record["path"])`` gives back its bytes). In text mode, control characters in
paths, labels and messages are escaped (``\\n``, ``\\x1b``...) so every input prints as one line.

Bounds: ``--top-k`` 1 to 1,000 (clipped to the number of labels), ``--batch-size`` 1 to 4,096; a template has one
plain ``{}`` and at most 1,000 characters; a labels file is a regular UTF-8 file of at most 16 MiB. An image of more
than 64 Mpx gets its error line (:func:`vlm.data.images.load_image`'s pixel budget); images are decoded one at a
time, and each is cut to the model's input size before the next is read.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import printable, read_labels

MAX_TOP_K = 1000
MAX_BATCH_SIZE = 4096


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
    p.add_argument("--top-k", type=int, default=5, help="predictions per image, at most 1,000 (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch, at most 4,096")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.add_argument("--accuracy-only", action="store_true", help="print only the accuracy over labelled images")
    p.add_argument("--heldout-labels-file", help="class names whose accuracy is also reported on its own")
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise SystemExit(error(f"--top-k must be between 1 and {MAX_TOP_K:,}"))
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise SystemExit(error(f"--batch-size must be between 1 and {MAX_BATCH_SIZE:,}"))
    try:
        if args.templates:  # checked before the checkpoint is loaded: a bad one is a usage error, not a crash later
            from vlm.zero_shot import get_templates

            args.templates = get_templates(args.templates)
        args.labels = read_labels(args.labels, args.labels_file)
        args.heldout = set(read_labels(None, args.heldout_labels_file)) if args.heldout_labels_file else set()
    except ValueError as e:  # UnsafeFileError included
        raise SystemExit(error(str(e))) from None
    return args


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
    from vlm.formats import CheckpointError
    from vlm.inference import CLIPPredictor, load
    from vlm.inputs import expand_paths, folder_metadata, load_batches

    try:
        model = load(args.checkpoint, batch_size=args.batch_size)
        if not isinstance(model, CLIPPredictor):
            raise CheckpointError(f"{args.checkpoint} is a {model.kind}: zero_shot.py needs a CLIP checkpoint")
        model.zero_shot_classifier(args.labels, args.templates)  # a label or template the model refuses: usage
    except (CheckpointError, ValueError) as e:
        return error(str(e))
    unlistable: dict = {}  # folders that could not be listed: one error line each
    paths = expand_paths(args.paths, unlistable)
    if not paths:
        return error("no images found in the given paths")
    # Labels that are not strings (a hand-edited file) are not ground truth: they would break the comparisons.
    truth = {p: row["label"] for p, row in folder_metadata(paths).items() if isinstance(row.get("label"), str)}
    failed = 0
    hits: list[tuple[str, bool]] = []  # (true label, correct) for labelled images
    # each image is cut to the model's input as soon as it is decoded: a batch never holds decoded images
    for batch in load_batches(paths, args.batch_size, unlistable, model.image_size):
        predictions = model.classify(batch.images, args.labels, args.templates, args.top_k) if batch.images else []
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
                hits.append((truth[path], preds[0][0] == truth[path]))
            if not args.accuracy_only:
                text = ", ".join(f"{printable(label)} ({prob:.3f})" for label, prob in preds)
                emit(
                    args.json,
                    {"path": exact, "predictions": [{"label": lb, "prob": round(pr, 6)} for lb, pr in preds]},
                    f"{shown}: {text}",
                )
    report_accuracy(hits, args.heldout, to_stderr=args.json and not args.accuracy_only)
    if failed:
        print(f"{failed} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def emit(as_json: bool, record: dict, text: str) -> None:
    """Prints one output line: ``record`` as JSON, or ``text`` (already escaped with :func:`printable`)."""
    print(json.dumps(record) if as_json else text, flush=True)


def report_accuracy(hits: list[tuple[str, bool]], heldout: set[str], to_stderr: bool) -> None:
    """Prints top-1 accuracy over the labelled images (and over the held-out classes when given)."""
    if not hits:
        return
    out = sys.stderr if to_stderr else sys.stdout
    correct = sum(ok for _, ok in hits)
    print(f"zero-shot top-1 accuracy: {correct / len(hits):.4f} ({correct}/{len(hits)} labelled images)", file=out)
    held = [ok for label, ok in hits if label in heldout]
    if held:
        print(f"zero-shot top-1 on held-out classes: {sum(held) / len(held):.4f} ({sum(held)}/{len(held)})", file=out)
    seen = [ok for label, ok in hits if label not in heldout]
    if held and seen:
        print(f"zero-shot top-1 on seen classes: {sum(seen) / len(seen):.4f} ({sum(seen)}/{len(seen)})", file=out)


if __name__ == "__main__":
    sys.exit(main())
