"""Answer questions about images with a trained Flamingo checkpoint (visual question answering).

    python scripts/answer.py --checkpoint runs/flamingo-vqa/checkpoints/last.ckpt \\
        --question "what colour is the star?" img1.png img2.png
    python scripts/answer.py --checkpoint CKPT --json data/shapes-vqa/validation
    python scripts/answer.py --checkpoint CKPT --score-only data/shapes-vqa/validation
    python scripts/answer.py --checkpoint CKPT --example a.png "what colour is it?" red \\
        --question "what colour is it?" query.png

Questions: ``--question`` is asked of every image. Without it, each image is asked the questions of the rows that
name it in its folder's ``metadata.jsonl`` (the VQA record format of docs/vqa.md: ``file_name``, ``question``, and
optionally ``answer`` / ``answers`` / ``heldout``; several rows may name one image): one question per image, or many.
An image without a question row then gets an error line. Where those rows have answers, the VQA accuracy
(:func:`vlm.vqa.vqa_metrics`: overall, and held-out and seen where rows carry ``heldout``) is reported at the end;
``--score-only`` prints only that. A malformed ``metadata.jsonl`` line or file costs only its questions (one
``warning:`` line per file). ``--example IMAGE QUESTION ANSWER`` (repeatable) shows solved examples before each
question (few-shot). A folder's images are processed in sorted order.

Exit codes: 0 every question answered, 1 some input failed, 2 usage error (bad arguments, missing or wrong checkpoint,
a checkpoint or example image that is a FIFO or device, a ``--question`` that with the examples does not fit the
decoder's context, no question at all). A ``metadata.jsonl`` question that does not fit gets its own error line.

Output: one line per question, in input order (an image's questions in their ``metadata.jsonl`` order). With
``--json`` each is an object ``{"path", "question", "answer"}``, or ``{"path", "error"}`` for an image that could not
be read or has no question (``{"path", "question", "error"}`` for a question too long for the model); the path is
exact (a file name that is not UTF-8 is written with ``surrogateescape``). In text mode a line is
``PATH: QUESTION -> ANSWER``, with control characters escaped (``\\n``, ``\\x1b``...) so each prints as one line.

Bounds as in ``scripts/caption.py``: ``--max-new-tokens`` 1 to 1,024, ``--num-beams`` 1 to 64, ``--batch-size`` 1 to
4,096 (images per batch), ``--question`` and each ``--example`` text at most 10,000 characters, at most 32
``--example`` triples; ``--workers`` as there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import MAX_PROMPT_CHARS, check_generation_args, emit, printable
from vlm.inputs import usage_error as error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, help="a Flamingo checkpoint (.ckpt) or a vlm export directory")
    p.add_argument("--question", help="asked of every image (default: each image's metadata.jsonl questions), at most "
                   "10,000 characters")
    p.add_argument("--example", nargs=3, action="append", default=[], metavar=("IMAGE", "QUESTION", "ANSWER"),
                   help="a solved example shown before each question (repeatable, at most 32: few-shot)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit, at most 1,024 (default: the task's)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width, at most 64 (1: greedy)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, at most 4,096")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding images ahead of the model, 0 to 64 (0: in this process; default: "
                   "none for a few images, else min(2, CPUs - 2))")
    p.add_argument("--json", action="store_true", help="one JSON object per output line")
    p.add_argument("--score-only", action="store_true",
                   help="print only the VQA accuracy against the answers in the folders' metadata.jsonl")
    args = p.parse_args(argv)
    check_generation_args(args, "triple", ["question", "answer"])
    if args.question is not None and not args.question.strip():
        raise SystemExit(error("--question is blank"))
    if args.question is not None and len(args.question) > MAX_PROMPT_CHARS:
        raise SystemExit(error(f"--question is {len(args.question):,} characters long: at most {MAX_PROMPT_CHARS:,}"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any loading: a FIFO or device would block or never end
        check_regular(args.checkpoint, "checkpoint", directory_ok=True)
        for image, _, _ in args.example:
            check_regular(image, "example image")
    except UnsafeFileError as e:
        return error(str(e))
    # Heavy imports after argument parsing, so --help and usage errors are instant; vlm.load does not import
    # Lightning for a checkpoint that records its inference settings.
    from vlm.data.images import ImageLoadError, load_image
    from vlm.data.prefetch import default_workers
    from vlm.data.transforms import eval_geometry
    from vlm.formats import CheckpointError
    from vlm.inference import load_flamingo
    from vlm.inputs import expand_paths, folder_questions, load_batches

    try:
        model = load_flamingo(args.checkpoint, "answering questions", batch_size=args.batch_size)
    except (CheckpointError, ValueError) as e:  # ValueError: a VLM_CPU_LINEAR that names no backend
        return error(str(e))
    try:
        to_input = eval_geometry(model.image_size)  # each example kept as the model's input, not decoded whole
        examples = [(to_input(load_image(path)), question, answer) for path, question, answer in args.example]
    except ImageLoadError as e:
        return error(f"example image {e}")
    unlistable: dict[Path, str] = {}  # folders that could not be listed: one error line each
    paths = expand_paths(args.paths, unlistable)
    if not paths:
        return error("no images found in the given paths")
    # Each image's questions: the one --question, or its metadata.jsonl rows ({"question", "answers", "heldout"})
    records = {} if args.question is not None else folder_questions(paths)
    if args.question is None and not records:
        return error("no questions: give --question, or images in folders whose metadata.jsonl has a question column")

    failed, lines, scored = 0, 0, []  # scored: (answer, reference answers, held-out flag) for questions with answers
    quiet = args.score_only
    workers = default_workers(len(paths)) if args.workers is None else args.workers
    for batch in load_batches(paths, args.batch_size, unlistable, model.image_size, workers):
        asked = {p: [{"question": args.question, "answers": []}] if args.question is not None else records.get(p, [])
                 for p in batch.ok_paths}
        try:
            answers = dict(zip(batch.ok_paths, answer_batch(model, batch.images, [asked[p] for p in batch.ok_paths],
                                                            examples, args, fixed=args.question is not None)))
        except ValueError as e:  # the --question or the examples outgrow the context: every input would fail
            return error(str(e))
        for path in batch.paths:
            exact, shown = str(path), printable(path)
            reason = batch.errors.get(path) or (None if asked[path] else "no question: give --question or add a "
                                                "metadata.jsonl row with a question for this image")
            if reason is not None:
                failed, lines = failed + 1, lines + 1
                if not quiet:
                    emit(args.json, {"path": exact, "error": reason}, f"{shown}: error: {printable(reason)}")
                continue
            for row, answer in zip(asked[path], answers[path]):
                question, lines = row["question"], lines + 1
                if isinstance(answer, ValueError):  # this question alone outgrows the context
                    failed += 1
                    if not quiet:
                        emit(args.json, {"path": exact, "question": question, "error": str(answer)},
                             f"{shown}: {printable(question)} -> error: {printable(str(answer))}")
                    continue
                if row["answers"]:
                    scored.append((answer, row["answers"], row.get("heldout")))
                if not quiet:
                    emit(args.json, {"path": exact, "question": question, "answer": answer},
                         f"{shown}: {printable(question)} -> {printable(answer)}")
    report_scores(scored, as_json=args.json, to_stderr=args.json and not quiet)
    if args.score_only and not scored:
        print("no answered questions: --score-only needs folders whose metadata.jsonl has answers", file=sys.stderr)
    if failed:
        print(f"{failed} of {lines} inputs failed", file=sys.stderr)  # an input: an image, or one of its questions
    return 1 if failed else 0


def answer_batch(model, images: list, asked: list[list[dict]], examples: list, args: argparse.Namespace,
                 fixed: bool) -> list[list[str | ValueError]]:
    """Each image's answers to its questions (one model call for the batch); ``[]`` for an image without questions.

    A question the model refuses (:class:`ValueError`: its prompt outgrows the decoder's context) is raised when it is
    the ``--question`` (``fixed``: every input would fail alike), else it becomes that question's answer, and the
    batch's other questions are asked one at a time so each still gets its own.
    """
    flat_images = [image for image, rows in zip(images, asked) for _ in rows]
    questions = [row["question"] for rows in asked for row in rows]
    if not questions:
        return [[] for _ in asked]
    decoding = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    try:
        flat: list[str | ValueError] = list(model.answer(flat_images, questions, examples, **decoding))
    except ValueError:
        if fixed:
            raise
        flat = []
        for image, question in zip(flat_images, questions):
            try:
                flat.append(model.answer(image, question, examples, **decoding)[0])
            except ValueError as e:
                flat.append(e)
    out, start = [], 0
    for rows in asked:
        out.append(flat[start:start + len(rows)])
        start += len(rows)
    return out


def report_scores(scored: list[tuple[str, list[str], object]], as_json: bool, to_stderr: bool) -> None:
    """VQA accuracy (overall, held-out and seen) over the questions with reference answers."""
    from vlm.vqa import vqa_metrics

    if not scored:
        return
    preds, refs, heldout = zip(*scored)
    scores = {"questions": len(scored), **vqa_metrics(preds, refs, heldout)}
    out = sys.stderr if to_stderr else sys.stdout
    if as_json:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}), file=out)
        return
    line = f"VQA accuracy: {scores['vqa_accuracy']:.4f}  ({len(scored)} questions)"
    for name, label in (("heldout", "held-out"), ("seen", "seen")):
        if f"vqa_accuracy_{name}" in scores:
            line += f"  {label}: {scores[f'vqa_accuracy_{name}']:.4f}"
    print(line, file=out)


if __name__ == "__main__":
    sys.exit(main())
