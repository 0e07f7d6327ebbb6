"""Caption images with a trained Flamingo checkpoint.

    python scripts/caption.py --checkpoint runs/flamingo/checkpoints/last.ckpt img1.png img2.png
    python scripts/caption.py --checkpoint CKPT --json --num-beams 3 data/shapes/validation
    python scripts/caption.py --checkpoint CKPT --score-only data/shapes/validation
    python scripts/caption.py --checkpoint CKPT --example a.png "a small red circle" --example b.png \\
        "a large blue star" query.png

A folder's images are processed in sorted order. ``--prompt`` without ``<image>`` is the text written after each
image before the caption (e.g. ``"A photo of"``); a prompt with ``<image>`` markers is used as written and needs
one marker per image: the ``--example`` images (whose captions it then spells out itself) plus the input image.
``--rerank CLIP_CHECKPOINT`` keeps ``--rerank-beams`` beam-search captions per image and prints the one that CLIP
checkpoint scores closest to the image (:meth:`vlm.inference.CaptionPredictor.rerank_with`).
When the images come from a folder whose ``metadata.jsonl`` has captions, BLEU-4, CIDEr and the attribute
accuracy (every colour, shape and size word right) are reported at the end; ``--score-only`` prints only those.
A malformed ``metadata.jsonl`` line or file costs only its captions (one ``warning:`` line per file).
Exit codes: 0 all inputs captioned, 1 some input failed, 2 usage error (bad arguments, missing or wrong checkpoint,
a checkpoint or example image that is a FIFO or device, a prompt that does not fit the images or the context).

Output: one line per input, in input order. With ``--json`` each is an object ``{"path", "caption"}`` or
``{"path", "error"}``; the path is exact (a file name that is not UTF-8 is written with ``surrogateescape``, so
``os.fsencode(record["path"])`` gives back its bytes). In text mode, control characters in paths, captions and
messages are escaped (``\\n``, ``\\x1b``...) so every input prints as one line.

Bounds (larger values are usage errors): ``--max-new-tokens`` 1 to 1,024, ``--num-beams`` 1 to 64,
``--length-penalty`` finite with absolute value at most 10, ``--batch-size`` 1 to 4,096, ``--prompt`` and each
``--example`` caption at most 10,000 characters, at most 32 ``--example`` pairs. An image of more than 64 Mpx gets its
error line (:func:`vlm.data.images.load_image`'s pixel budget); images are decoded one at a time, and each is cut to
the model's input size before the next is read. ``--workers N`` decodes in N processes ahead of the model (a few
batches in flight at most, the same output; default: none for a few images, else min(2, CPUs - 2)); ``--workers 0``
decodes in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import MAX_PROMPT_CHARS, check_generation_args, emit, printable
from vlm.inputs import usage_error as error

MAX_LENGTH_PENALTY = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a Flamingo checkpoint (.ckpt) or a vlm export directory")
    p.add_argument("--prompt",
                   help="text after the image (or a full prompt with <image> markers), at most 10,000 characters")
    p.add_argument("--example", nargs=2, action="append", default=[], metavar=("IMAGE", "CAPTION"),
                   help="an in-context example shown before each input (repeatable, at most 32: few-shot)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="caption length limit, at most 1,024 (default: the task's)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width, at most 64 (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty, -10 to 10")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, at most 4,096")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding images ahead of the model, 0 to 64 (0: in this process; default: "
                   "none for a few images, else min(2, CPUs - 2))")
    p.add_argument("--rerank", metavar="CLIP_CHECKPOINT",
                   help="a CLIP checkpoint that picks each caption among the beam search's (e.g. the own-data CLIP "
                   "stage, whose vision tower the captioner reads)")
    p.add_argument("--rerank-beams", type=int, default=8,
                   help="with --rerank: captions per image the CLIP chooses among, 1 to 64 (default 8)")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.add_argument("--score-only", action="store_true",
                   help="print only BLEU-4, CIDEr and attribute accuracy against the folders' metadata.jsonl captions")
    args = p.parse_args(argv)
    check_generation_args(args, "pair", ["caption"])
    if not (math.isfinite(args.length_penalty) and abs(args.length_penalty) <= MAX_LENGTH_PENALTY):
        raise SystemExit(error(f"--length-penalty must be a finite number between -{MAX_LENGTH_PENALTY:g} and "
                               f"{MAX_LENGTH_PENALTY:g}"))
    if not 1 <= args.rerank_beams <= 64:
        raise SystemExit(error(f"--rerank-beams must be between 1 and 64, got {args.rerank_beams}"))
    if args.prompt is not None and len(args.prompt) > MAX_PROMPT_CHARS:
        raise SystemExit(error(f"--prompt is {len(args.prompt):,} characters long: at most {MAX_PROMPT_CHARS:,}"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any loading: a FIFO or device would block or never end
        check_regular(args.checkpoint, "checkpoint", directory_ok=True)
        if args.rerank is not None:
            check_regular(args.rerank, "--rerank checkpoint", directory_ok=True)
        for image, _ in args.example:
            check_regular(image, "example image")
    except UnsafeFileError as e:
        return error(str(e))
    # Heavy imports after argument parsing, so --help and usage errors are instant; vlm.load does not import
    # Lightning for a checkpoint that records its inference settings.
    from vlm.data.images import ImageLoadError, load_image
    from vlm.data.prefetch import default_workers
    from vlm.data.transforms import eval_geometry
    from vlm.formats import CheckpointError
    from vlm.inference import CLIPPredictor, load, load_flamingo
    from vlm.inputs import expand_paths, folder_metadata, load_batches

    try:
        model = load_flamingo(args.checkpoint, "caption.py", batch_size=args.batch_size)
        if args.rerank is not None:
            clip = load(args.rerank, batch_size=args.batch_size)
            if not isinstance(clip, CLIPPredictor):
                return error(f"--rerank {args.rerank} is a {clip.kind}: captions are reranked by a CLIP checkpoint")
            model.rerank_with(clip, args.rerank_beams)
    except (CheckpointError, ValueError) as e:  # ValueError: a VLM_CPU_LINEAR that names no backend
        return error(str(e))
    try:
        prompt = model.build_prompt(args.prompt, [caption for _, caption in args.example])
        to_input = eval_geometry(model.image_size)  # each example kept as the model's input, not decoded whole
        examples = [(to_input(load_image(path)), caption) for path, caption in args.example]
    except ImageLoadError as e:
        return error(f"example image {e}")
    except ValueError as e:
        return error(str(e))
    unlistable: dict[Path, str] = {}  # folders that could not be listed: one error line each
    paths = expand_paths(args.paths, unlistable)
    if not paths:
        return error("no images found in the given paths")

    metadata = folder_metadata(paths)
    references = {p: row["caption"] for p, row in metadata.items() if isinstance(row.get("caption"), str)}
    failed = 0
    scored: list[tuple[str, str, bool]] = []  # (prediction, reference, held out) for images with a reference
    quiet = args.score_only
    # each image is cut to the model's input as soon as it is decoded (in worker processes, ahead of the model, with
    # workers): a batch never holds decoded images
    workers = default_workers(len(paths)) if args.workers is None else args.workers
    for batch in load_batches(paths, args.batch_size, unlistable, model.image_size, workers):
        captions: dict[Path, str] = {}
        if batch.images:
            try:
                texts = model.caption(batch.images, prompt, examples, args.max_new_tokens, args.num_beams,
                                      length_penalty=args.length_penalty)
            except ValueError as e:  # e.g. the prompt plus caption outgrow the context
                return error(str(e))
            captions = dict(zip(batch.ok_paths, texts))
        for path in batch.paths:
            # JSON gets the exact name (str(path) carries non-UTF-8 bytes as surrogates, which json.dumps writes
            # as \udcXX escapes); text mode gets it, and the model's caption, escaped onto one line.
            exact, shown = str(path), printable(path)
            if path in batch.errors:
                failed += 1
                reason = batch.errors[path]
                if not quiet:
                    emit(args.json, {"path": exact, "error": reason}, f"{shown}: error: {printable(reason)}")
                continue
            if path in references:
                scored.append((captions[path], references[path], bool(metadata[path].get("heldout", False))))
            if not quiet:
                caption = captions[path]
                emit(args.json, {"path": exact, "caption": caption}, f"{shown}: {printable(caption)}")
    report_scores(model.captioner, scored, as_json=args.json, to_stderr=args.json and not quiet)
    if args.score_only and not scored:
        print("no labelled images: --score-only needs folders with metadata.jsonl captions", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def report_scores(task, scored: list[tuple[str, str, bool]], as_json: bool, to_stderr: bool) -> None:
    """BLEU-4, CIDEr and attribute accuracy (overall, held-out and seen) over the images with references."""
    from vlm.captions import attribute_correct, caption_scores

    if not scored:
        return
    preds, refs, heldout = zip(*scored)
    scores = {"images": len(scored), **caption_scores(preds, refs)}
    if task.attribute_words:
        words = set(task.attribute_words)
        hits = [attribute_correct(p, r, words) for p, r in zip(preds, refs)]
        scores["attribute_accuracy"] = sum(hits) / len(hits)
        for name, keep in (("heldout", True), ("seen", False)):
            sel = [h for h, held in zip(hits, heldout) if held == keep]
            if sel and any(heldout):
                scores[f"attribute_accuracy_{name}"] = sum(sel) / len(sel)
    out = sys.stderr if to_stderr else sys.stdout
    if as_json:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}), file=out)
        return
    print(f"BLEU-4: {scores['bleu4']:.4f}  CIDEr: {scores['cider']:.4f}  ({len(scored)} images)", file=out)
    if "attribute_accuracy" in scores:
        line = f"attribute accuracy (every colour, shape and size word right): {scores['attribute_accuracy']:.4f}"
        if "attribute_accuracy_heldout" in scores:
            line += f"  held-out: {scores['attribute_accuracy_heldout']:.4f}"
        if "attribute_accuracy_seen" in scores:
            line += f"  seen: {scores['attribute_accuracy_seen']:.4f}"
        print(line, file=out)


if __name__ == "__main__":
    sys.exit(main())
