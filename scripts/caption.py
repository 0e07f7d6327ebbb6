"""Caption images with a trained Flamingo checkpoint.

    python scripts/caption.py --checkpoint runs/flamingo/checkpoints/last.ckpt img1.png img2.png
    python scripts/caption.py --checkpoint CKPT --json --num-beams 3 data/shapes/validation
    python scripts/caption.py --checkpoint CKPT --score-only data/shapes/validation
    python scripts/caption.py --checkpoint CKPT --example a.png "a small red circle" --example b.png \\
        "a large blue star" query.png

A folder's images are processed in sorted order. ``--prompt`` without ``<image>`` is the text written after each
image before the caption (e.g. ``"A photo of"``); a prompt with ``<image>`` markers is used as written and needs
one marker per image: the ``--example`` images (whose captions it then spells out itself) plus the input image.
When the images come from a folder whose ``metadata.jsonl`` has captions, BLEU-4, CIDEr and the attribute
accuracy (every colour, shape and size word right) are reported at the end; ``--score-only`` prints only those.
Exit codes: 0 all inputs captioned, 1 some input failed, 2 usage error (bad arguments, missing or wrong checkpoint,
a prompt that does not fit the images or the context).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a Flamingo checkpoint (.ckpt) or a vlm export directory")
    p.add_argument("--prompt", help="text after the image (or a full prompt with <image> markers)")
    p.add_argument("--example", nargs=2, action="append", default=[], metavar=("IMAGE", "CAPTION"),
                   help="an in-context example shown before each input (repeatable: few-shot)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit (default: the task's)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.add_argument("--score-only", action="store_true",
                   help="print only BLEU-4, CIDEr and attribute accuracy against the folders' metadata.jsonl captions")
    args = p.parse_args(argv)
    for name in ("num_beams", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def build_prompt(prompt: str | None, examples: list[list[str]], tokenizer) -> str:
    """The generation prompt for one input; raises ValueError when its ``<image>`` markers do not fit."""
    from vlm.data.gpt2_tokenizer import IMAGE_TOKEN
    from vlm.generation import few_shot_prompt

    images = len(examples) + 1
    if prompt is not None and IMAGE_TOKEN in prompt:
        found = prompt.count(IMAGE_TOKEN)
        if found != images:
            raise ValueError(f"the prompt has {found} {IMAGE_TOKEN} marker(s) but there are {images} image(s) per "
                             f"input ({len(examples)} example(s) + the input image)")
        return prompt
    prefix = tokenizer.prompt if prompt is None else prompt
    return few_shot_prompt([caption for _, caption in examples], prefix)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing, so --help and usage errors are instant.
    import torch

    # Without Lightning where the checkpoint allows (vlm.inference): it would take longer to import than torch.
    from vlm.checkpoint import CheckpointError
    from vlm.data.images import ImageLoadError, display_path, load_image
    from vlm.data.transforms import eval_transform
    from vlm.inference import load_captioner
    from vlm.inputs import expand_paths, folder_metadata, load_batches

    def usage_error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        task = load_captioner(args.checkpoint)
    except CheckpointError as e:
        return usage_error(str(e))
    tokenizer = task.tokenizer
    transform = eval_transform(task.image_size, task.image_mean, task.image_std)
    try:
        prompt = build_prompt(args.prompt, args.example, tokenizer)
        prompt_len = tokenizer.encode_prompts([prompt])["input_ids"].shape[1]
        if prompt_len >= task.model.context_length:
            raise ValueError(f"the prompt is {prompt_len} tokens long, the decoder's context is "
                             f"{task.model.context_length} tokens")
        examples = torch.stack([transform(load_image(path)) for path, _ in args.example]) if args.example else None
    except ImageLoadError as e:
        return usage_error(f"example image {e}")
    except ValueError as e:
        return usage_error(str(e))
    paths = expand_paths(args.paths)
    if not paths:
        return usage_error("no images found in the given paths")

    metadata = folder_metadata(paths)
    references = {p: row["caption"] for p, row in metadata.items() if isinstance(row.get("caption"), str)}
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    failed = 0
    scored: list[tuple[str, str, bool]] = []  # (prediction, reference, held out) for images with a reference
    quiet = args.score_only
    for batch in load_batches(paths, transform, args.batch_size):
        captions: dict[Path, str] = {}
        if batch.images is not None:
            images = batch.images
            if examples is not None:  # (b, k + 1, 3, H, W): the examples, then the input
                shots = examples.unsqueeze(0).expand(images.shape[0], *examples.shape)
                images = torch.cat([shots, images.unsqueeze(1)], dim=1)
            try:
                texts = task.generate_captions(images, prompt, max_new_tokens, args.num_beams,
                                               length_penalty=args.length_penalty)
            except ValueError as e:  # e.g. the prompt plus caption outgrow the context
                return usage_error(str(e))
            captions = dict(zip(batch.ok_paths, texts))
        for path in batch.paths:
            shown = display_path(path)
            if path in batch.errors:
                failed += 1
                error = batch.errors[path]
                if not quiet:
                    emit(args.json, {"path": shown, "error": error}, f"{shown}: error: {error}")
                continue
            if path in references:
                scored.append((captions[path], references[path], bool(metadata[path].get("heldout", False))))
            if not quiet:
                emit(args.json, {"path": shown, "caption": captions[path]}, f"{shown}: {captions[path]}")
    report_scores(task, scored, as_json=args.json, to_stderr=args.json and not quiet)
    if args.score_only and not scored:
        print("no labelled images: --score-only needs folders with metadata.jsonl captions", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(paths)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def emit(as_json: bool, record: dict, text: str) -> None:
    print(json.dumps(record) if as_json else text, flush=True)


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
