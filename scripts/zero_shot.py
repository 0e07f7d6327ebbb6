"""Zero-shot classify images with a trained CLIP checkpoint.

    python scripts/zero_shot.py --checkpoint runs/clip/checkpoints/last.ckpt --labels "red circle,blue square" img.png
    python scripts/zero_shot.py --checkpoint CKPT --labels-file data/shapes/classnames.txt --json data/shapes/validation

A folder's images are processed in sorted order. If a folder holds a ``metadata.jsonl`` with a ``label`` column,
the accuracy over those images is reported at the end. Exit codes: 0 all inputs classified, 1 some input failed,
2 usage error (bad arguments, missing or wrong checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    p.add_argument("--top-k", type=int, default=5, help="predictions per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.add_argument("--accuracy-only", action="store_true", help="print only the accuracy over labelled images")
    p.add_argument("--heldout-labels-file", help="class names whose accuracy is also reported on its own")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    try:
        args.labels = read_labels(args.labels, args.labels_file)
        args.heldout = set(read_labels(None, args.heldout_labels_file)) if args.heldout_labels_file else set()
    except ValueError as e:
        p.error(str(e))
    return args


def read_labels(inline: str | None, path: str | None) -> list[str]:
    """Class names from a comma-separated string or a file; blank, duplicate or missing ones are usage errors."""
    if path is not None:
        try:
            raw = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read labels file {path}: {e}") from None
        raw = [line for line in raw if line.strip()]
    else:
        raw = inline.split(",")
    labels = [label.strip() for label in raw]
    if not labels or not any(labels):
        raise ValueError("no labels given: pass at least one non-blank class name")
    blank = [i + 1 for i, label in enumerate(labels) if not label]
    if blank:
        raise ValueError(f"label number {blank[0]} is blank")
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ValueError(f"duplicate label {dupes[0]!r}")
    return labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing, so --help and usage errors are instant.
    # Without Lightning where the checkpoint allows (vlm.inference): it would take longer to import than torch.
    from vlm.checkpoint import CheckpointError
    from vlm.data.images import display_path
    from vlm.data.transforms import eval_transform
    from vlm.inference import load_zero_shot
    from vlm.inputs import expand_paths, folder_metadata, load_batches
    from vlm.zero_shot import build_classifier, classify

    try:
        task = load_zero_shot(args.checkpoint)
        classifier = build_classifier(task.model, task.tokenizer, args.labels, args.templates or task.templates)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = expand_paths(args.paths)
    if not paths:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    truth = {p: row.get("label") for p, row in folder_metadata(paths).items()}
    transform = eval_transform(task.image_size, task.image_mean, task.image_std)
    k = min(args.top_k, len(args.labels))
    failed = 0
    hits: list[tuple[str, bool]] = []  # (true label, correct) for labelled images
    for batch in load_batches(paths, transform, args.batch_size):
        if batch.images is not None:
            probs = classify(task.model, batch.images, classifier)
            top = probs.topk(k, dim=1)
            results = {
                p: [(args.labels[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
                for p, vals, idx in zip(batch.ok_paths, top.values, top.indices)
            }
        for path in batch.paths:
            shown = display_path(path)
            if path in batch.errors:
                failed += 1
                if not args.accuracy_only:
                    emit(
                        args.json, {"path": shown, "error": batch.errors[path]}, f"{shown}: error: {batch.errors[path]}"
                    )
                continue
            preds = results[path]
            if truth.get(path) is not None:
                hits.append((truth[path], preds[0][0] == truth[path]))
            if not args.accuracy_only:
                text = ", ".join(f"{label} ({prob:.3f})" for label, prob in preds)
                emit(
                    args.json,
                    {"path": shown, "predictions": [{"label": lb, "prob": round(pr, 6)} for lb, pr in preds]},
                    f"{shown}: {text}",
                )
    report_accuracy(hits, args.heldout, to_stderr=args.json and not args.accuracy_only)
    if failed:
        print(f"{failed} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def emit(as_json: bool, record: dict, text: str) -> None:
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
