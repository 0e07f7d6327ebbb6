"""``vlm export``, ``vlm explain``, ``vlm index``, ``vlm search``, ``vlm retrieval`` and ``vlm eval``: command-line
entry points over :mod:`vlm.formats`, :mod:`vlm.explain`, :mod:`vlm.index`, :mod:`vlm.retrieval` and
:mod:`vlm.fewshot` (LightningCLI runs the training commands)."""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from collections.abc import Callable

from vlm.formats.build import CheckpointError
from vlm.formats.export import CONFIG_FILE, WEIGHTS_FILE, export_task
from vlm.formats.load import load_task
from vlm.inputs import printable


def export_main(argv: list[str] | None = None) -> int:
    """``vlm export --checkpoint CKPT --out DIR``; returns the exit code (2 for a refused file or bad usage)."""
    parser = argparse.ArgumentParser(
        prog="vlm export",
        description="Write a task's weights as model.safetensors plus its constructor config (config.json).",
    )
    parser.add_argument("--checkpoint", required=True, help="a Lightning checkpoint (.ckpt) or an export directory")
    parser.add_argument("--out", required=True, help="output directory")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    from vlm.inputs import printable  # every message here may quote the file's own text

    try:
        task = load_task(args.checkpoint)
        out = export_task(task, args.out)
    except CheckpointError as e:
        print(f"vlm export: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vlm export: error: cannot write {printable(args.out)}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(printable(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE} ({type(task).__name__})"))
    return 0


def explain_main(argv: list[str] | None = None) -> int:
    """``vlm explain --checkpoint CKPT IMAGE... [--labels ... | --labels-file F] --out DIR``: attention maps as PNG
    overlays and JSON; returns the exit code (0 all explained, 1 some image failed, 2 usage error)."""
    from pathlib import Path

    from vlm.data.files import UnsafeFileError, check_regular
    from vlm.explain import LABEL_METHODS
    from vlm.inputs import expand_paths, load_batches, read_labels

    parser = argparse.ArgumentParser(
        prog="vlm explain",
        description="Where the model looks: for a CLIP checkpoint, attention rollout, class-token attention and one "
        "map per label; for a Flamingo checkpoint, the caption with one map per word. Writes DIR/<image>.png "
        "(overlays) and DIR/<image>.json (the raw maps), only inside DIR: <image> is the input's name without "
        "separators or leading dots, with _2, _3... when two inputs share a name.",
    )
    parser.add_argument("paths", nargs="*", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--checkpoint", required=True, help="a vlm fit checkpoint (.ckpt) or a vlm export directory")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (CLIP)")
    labels.add_argument("--labels-file", help="file with one class name per line (CLIP)")
    parser.add_argument("--method", choices=LABEL_METHODS, default="relevance",
                        help="per-label maps: gradient-weighted attention (relevance, default) or patch-text cosine")
    parser.add_argument("--max-labels", type=int, default=4, help="label maps drawn per image (the best-scoring)")
    parser.add_argument("--out", default="explain", help="output folder (default: explain)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    parser.add_argument("--pointing", metavar="SCENES",
                        help="instead of images: score the maps on a `vlm data scenes` folder (does each object's map "
                        "peak inside its box?) and print the hit rate against chance as JSON")
    parser.add_argument("--limit", type=int, help="with --pointing: the first N scenes only")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def fail(message: str) -> int:
        print(f"vlm explain: error: {printable(message)}", file=sys.stderr)
        return 2

    if bool(args.paths) == bool(args.pointing):
        return fail("give images to explain, or --pointing SCENES (not both)")
    if args.pointing:
        return _pointing(args, fail)
    try:
        check_regular(args.checkpoint, "checkpoint", directory_ok=True)
        names = read_labels(args.labels, args.labels_file) if (args.labels or args.labels_file) else None
        if not 1 <= args.max_labels <= 64:
            raise ValueError("--max-labels must be between 1 and 64")
    except (UnsafeFileError, ValueError) as e:
        return fail(str(e))
    from vlm.explain.render import OutputPathError, inside, output_name, render, write_text
    from vlm.inference import CaptionPredictor, CLIPPredictor, load

    try:
        model = load(args.checkpoint, batch_size=1)
        if isinstance(model, CLIPPredictor) and not names:
            raise ValueError("a CLIP checkpoint explains labels: give --labels or --labels-file")
        if not isinstance(model, (CLIPPredictor, CaptionPredictor)):
            raise ValueError(f"{args.checkpoint} is a {model.kind}: vlm explain needs a CLIP or Flamingo checkpoint")
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {out}: {e.strerror or e}")
    unlistable: dict = {}
    paths = expand_paths(args.paths, unlistable)
    if not paths:
        return fail("no images found in the given paths")
    failed, used = 0, set()
    for batch in load_batches(paths, 1, unlistable):
        for path in batch.paths:
            if path in batch.errors:
                failed += 1
                _emit(args.json, {"path": str(path), "error": batch.errors[path]},
                      f"{printable(path)}: error: {printable(batch.errors[path])}")
                continue
            image = batch.images[batch.ok_paths.index(path)]
            try:
                kwargs = {"method": args.method} if isinstance(model, CLIPPredictor) else {}
                exp = model.explain(image, names, **kwargs)[0]
            except ValueError as e:  # a label or template the model refuses: the same for every image
                return fail(str(e))
            # a safe, unused name (``..png`` would name the folder's parent), checked to resolve inside --out
            name = output_name(path, used)
            try:
                png, raw = inside(out, f"{name}.png"), inside(out, f"{name}.json")
                render(image, exp, png, args.max_labels)
                write_text(raw, json.dumps({"path": str(path), **exp.to_json()}))
            except (OutputPathError, OSError) as e:
                failed += 1
                reason = str(e) if isinstance(e, OutputPathError) else f"cannot write into {out}: {e.strerror or e}"
                _emit(args.json, {"path": str(path), "error": reason}, f"{printable(path)}: error: {printable(reason)}")
                continue
            png, raw = out / png.name, out / raw.name  # shown as under --out, as given
            record = {"path": str(path), "png": str(png), "json": str(raw)}
            if exp.caption is not None:
                record["caption"] = exp.caption
            else:
                record["labels"] = sorted(exp.scores, key=lambda k: -exp.scores[k])[: args.max_labels]
            said = exp.caption if exp.caption is not None else ", ".join(record["labels"])
            _emit(args.json, record, f"{printable(path)}: {printable(said)} -> {printable(png)}")
    return 1 if failed else 0


def _pointing(args: argparse.Namespace, fail) -> int:
    from vlm.explain.localise import caption_pointing, clip_pointing
    from vlm.inference import CaptionPredictor, CLIPPredictor, load

    try:
        model = load(args.checkpoint, batch_size=1)
        if isinstance(model, CLIPPredictor):
            result = {"method": args.method, **clip_pointing(model, args.pointing, args.method, args.limit)}
        elif isinstance(model, CaptionPredictor):
            result = {"method": "caption words", **caption_pointing(model, args.pointing, args.limit)}
        else:
            raise ValueError(f"{args.checkpoint} is a {model.kind}: vlm explain needs a CLIP or Flamingo checkpoint")
    except (CheckpointError, ValueError, OSError, KeyError) as e:
        return fail(f"{args.pointing}: {e}")
    print(json.dumps(result))
    return 0


def _emit(as_json: bool, record: dict, text: str) -> None:
    print(json.dumps(record) if as_json else text, flush=True)


# ------------------------------------------------------------------- vlm index / vlm search / vlm retrieval
def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)
    return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None, bounds: dict[str, int]) -> argparse.Namespace:
    """The arguments, checked against ``bounds`` (an option outside 1..``bounds[option]`` is a usage error).

    Raises:
        SystemExit: argparse's usage error or ``--help``, or an option out of bounds, once reported (:func:`_exits`
            turns it into the command's exit code).
    """
    args = parser.parse_args(argv)
    for option, high in bounds.items():
        if not 1 <= getattr(args, option[2:].replace("-", "_")) <= high:
            raise SystemExit(_error(parser.prog, f"{option} must be between 1 and {high:,}"))
    return args


def _exits(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main``, returning the code of a ``SystemExit`` it raises (an argparse exit, a :func:`_parse` error)."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except SystemExit as e:
            return int(e.code or 0)

    return run


@_exits
def index_main(argv: list[str] | None = None) -> int:
    """``vlm index --checkpoint CKPT --images DIR --out INDEX [--batch-size N] [--rebuild] [--workers N]``; returns the
    exit code."""
    from vlm.data.prefetch import MAX_WORKERS
    from vlm.index import MAX_BATCH_SIZE, build_index
    p = argparse.ArgumentParser(prog="vlm index", description="Embed a folder of images into a search index.")
    p.add_argument("--checkpoint", required=True, help="a CLIP checkpoint (.ckpt) or vlm export folder")
    p.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the index file (safetensors), created or updated")
    p.add_argument("--batch-size", type=int, default=64, help=f"images per batch, 1 to {MAX_BATCH_SIZE:,}")
    p.add_argument("--rebuild", action="store_true", help="re-embed every image, replacing any existing index")
    p.add_argument("--workers", type=int, default=None, help=f"processes decoding images ahead of the model, 0 to "
                   f"{MAX_WORKERS} (0: in this process; default: none for a few images, else min(2, CPUs - 2))")
    args = _parse(p, argv, {"--batch-size": MAX_BATCH_SIZE})
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        return _error(p.prog, f"--workers must be between 0 and {MAX_WORKERS}")
    try:
        r = build_index(args.checkpoint, args.images, args.out, args.batch_size, rebuild=args.rebuild,
                        workers=args.workers)
    except ValueError as e:  # CheckpointError, IndexFileError, UnsafeFileError included
        return _error(p.prog, str(e))
    except OSError as e:
        print(f"{p.prog}: error: cannot write {printable(args.out)}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{printable(args.out)}: {r.total} images ({r.embedded} embedded, {r.reused} unchanged, {r.removed} removed, "
          f"{len(r.failed)} skipped)")
    return 1 if r.failed else 0


@_exits
def search_main(argv: list[str] | None = None) -> int:
    """``vlm search --index INDEX QUERY [--top-k K] [--json] [--checkpoint CKPT]``; returns the exit code."""
    from vlm.index import MAX_TOP_K, IndexFileError, fingerprint, load_clip, load_index, search
    p = argparse.ArgumentParser(prog="vlm search", description="Find the indexed images that best match a text.")
    p.add_argument("query", nargs="+", help="the text to search for (several words are joined by spaces)")
    p.add_argument("--index", required=True, help="an index written by vlm index")
    p.add_argument("--top-k", type=int, default=10, help=f"results, 1 to {MAX_TOP_K:,} (default 10)")
    p.add_argument("--json", action="store_true", help='one {"query", "results": [{"path", "score"}]} object')
    p.add_argument("--checkpoint", help="the CLIP checkpoint (default: the one the index was built with)")
    args = _parse(p, argv, {"--top-k": MAX_TOP_K})
    if not (query := " ".join(args.query)).strip():
        return _error(p.prog, "the query is empty")
    try:
        index = load_index(args.index)
        checkpoint = args.checkpoint or index.checkpoint
        if fingerprint(checkpoint) != index.fingerprint:
            raise IndexFileError(f"{args.index} was built with another checkpoint ({index.checkpoint}) than "
                                 f"{checkpoint}: rebuild it with vlm index --rebuild")
        results = search(index, load_clip(checkpoint), query, args.top_k)
    except CheckpointError as e:  # the one the index records may have moved
        hint = "" if args.checkpoint else " (the checkpoint the index records; give another with --checkpoint)"
        return _error(p.prog, f"{e}{hint}")
    except ValueError as e:  # IndexFileError included
        return _error(p.prog, str(e))
    if args.json:
        print(json.dumps({"query": query, "results": [{"path": str(p), "score": round(s, 6)} for p, s in results]}))
    for rank, (path, score) in enumerate(results if not args.json else [], start=1):
        print(f"{rank:>3}  {score:.4f}  {printable(path)}", flush=True)
    return 0


@_exits
def retrieval_main(argv: list[str] | None = None) -> int:
    """``vlm retrieval --checkpoint CKPT --images DIR [--compositional] [--json] [--batch-size N]``; returns the exit
    code."""
    from vlm.index import MAX_BATCH_SIZE, load_clip
    from vlm.retrieval import RECALL_KS, retrieval_eval
    p = argparse.ArgumentParser(prog="vlm retrieval", description="Image-text recall@1/5/10 over a captioned folder.")
    p.add_argument("--checkpoint", required=True, help="a CLIP checkpoint (.ckpt) or vlm export folder")
    p.add_argument("--images", required=True, help="a folder whose metadata.jsonl rows have file_name and "
                   "captions (a list) or caption (rows naming one image add up)")
    p.add_argument("--batch-size", type=int, default=64, help=f"images per batch, 1 to {MAX_BATCH_SIZE:,}")
    p.add_argument("--compositional", action="store_true", help="also how often each caption beats hard negatives "
                   "made from it (SugarCrepe-style replace- and swap-attribute), from the rows' label")
    p.add_argument("--json", action="store_true", help="one JSON object with the counts and recalls")
    args = _parse(p, argv, {"--batch-size": MAX_BATCH_SIZE})
    try:
        report = retrieval_eval(load_clip(args.checkpoint, args.batch_size), args.images,
                                compositional=args.compositional)
    except ValueError as e:  # CheckpointError, UnsafeFileError included
        return _error(p.prog, str(e))
    m, comp = report.metrics, report.compositional
    no_labels = (f"compositional: not measured, no caption in {args.images}/metadata.jsonl has a 'label' (a phrase "
                 "found word for word in the caption)")
    if args.json:
        extra = {"compositional": comp} if args.compositional else {}
        print(json.dumps({"images": report.images, "captions": report.captions, **m, **extra}))
        if args.compositional and comp is None:
            print(printable(no_labels), file=sys.stderr)
    else:
        print(f"{report.images} images, {report.captions} captions")
        for name, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            print(f"{label}  " + "  ".join(f"R@{k} {m[f'{name}_R@{k}']:.3f}" for k in RECALL_KS))
        if args.compositional:
            print(printable(no_labels) if comp is None else "\n".join(map(_compositional_line, comp.items())))
    return 1 if report.failed else 0


def _compositional_line(item: tuple[str, dict | None]) -> str:
    kind, score = item[0].replace("_", "-"), item[1]
    if score is None:
        return f"{kind}  not applicable (no caption gives such a negative)"
    return (f"{kind}  accuracy {score['pair_accuracy']:.3f} of {score['pairs']:,} pairs  "
            f"images {score['image_accuracy']:.3f} of {score['images']:,}")


# ----------------------------------------------------------------------------------------------------- vlm eval
class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``vlm eval: error:`` line (a ValueError for :func:`eval_main`)."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def _support_folder(data: str, support: str | None) -> str:
    """``--support``, or by default the ``train`` folder beside a ``validation`` / ``val`` split."""
    from pathlib import Path

    if support is not None:
        return support
    path = Path(data).absolute()
    if path.name in ("validation", "val") and (path.parent / "train").is_dir():
        return str(path.parent / "train")
    raise ValueError(f"give --support DIR, the pool the examples come from ({data} is not a validation or val folder "
                     "with a train folder beside it)")


def eval_main(argv: list[str] | None = None) -> int:
    """``vlm eval --checkpoint FLAMINGO --task caption|vqa|classify --data DIR [--support DIR] [--shots 0,4,8]
    [--select random,rices] [--clip CKPT] [--index INDEX] [--trials N] [--seed S] [--limit N] [--batch-size B]
    [--out FILE] [--json]``: few-shot evaluation (:mod:`vlm.fewshot`); returns the exit code (0 done, 1 some image
    could not be read or --out not written, 2 usage error)."""
    from vlm.fewshot import METRICS, SELECTS, TASKS, FewShotEval, class_names, format_table, read_items
    from vlm.index import MAX_BATCH_SIZE
    from vlm.inference import CaptionPredictor, load

    p = _OneLineParser(prog="vlm eval", description="Few-shot evaluation of a Flamingo checkpoint, as OpenFlamingo's "
                       "eval suite: k solved examples (random or retrieved by CLIP similarity, RICES) before each "
                       "query; one row per (select, shots) with the metric's mean and std over trials.")
    p.add_argument("--checkpoint", required=True, help="a Flamingo checkpoint (.ckpt) or vlm export folder")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", required=True, help="the evaluation split: VQA records, a captioned or labelled folder")
    p.add_argument("--support", help="the pool of examples (default: the train folder beside a validation/val --data)")
    p.add_argument("--shots", default="0,4,8", help="comma-separated shot counts (default 0,4,8)")
    p.add_argument("--select", default="random", help="random, rices, or both comma-separated (default random)")
    p.add_argument("--clip", help="the CLIP checkpoint that embeds the images for rices")
    p.add_argument("--index", help="a vlm index of the support folder built with --clip (its embeddings are reused)")
    p.add_argument("--trials", type=int, default=3, help="random draws per shot count, 1 to 100 (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--limit", type=int, help="evaluate N queries only, sampled with --seed (kept in file order)")
    p.add_argument("--batch-size", type=int, default=8, help=f"queries per batch, 1 to {MAX_BATCH_SIZE:,} (default 8)")
    p.add_argument("--out", help="write the full results (every trial's predictions) as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the table")
    try:
        args = p.parse_args(argv)
        if not all(k.strip().isdigit() for k in args.shots.split(",")):
            raise ValueError(f"--shots takes comma-separated counts such as 0,4,8, not {args.shots!r}")
        shots = list(dict.fromkeys(int(k) for k in args.shots.split(",")))
        selects = list(dict.fromkeys(s.strip() for s in args.select.split(",")))
        if args.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, not {args.task!r}")
        if not all(0 <= k <= 64 for k in shots) or not all(s in SELECTS for s in selects):
            raise ValueError(f"--shots takes counts from 0 to 64 and --select {' or '.join(SELECTS)}")
        if not (1 <= args.trials <= 100 and args.seed >= 0 and 1 <= args.batch_size <= MAX_BATCH_SIZE
                and (args.limit is None or args.limit >= 1)):  # fmt: skip
            raise ValueError(f"--trials must be 1 to 100, --seed >= 0, --batch-size 1 to {MAX_BATCH_SIZE:,}, "
                             "--limit >= 1")
        rices = "rices" in selects and any(shots)
        if rices and not args.clip:
            raise ValueError("--select rices needs --clip CKPT, the CLIP that embeds the images")
        if args.index and not rices:
            raise ValueError("--index serves --select rices (with shots above 0)")
        queries = read_items(args.task, args.data)
        if args.limit is not None and args.limit < len(queries):  # a subset per seed, as OpenFlamingo samples one
            queries = [queries[i] for i in sorted(random.Random(args.seed).sample(range(len(queries)), args.limit))]
        support = _support_folder(args.data, args.support) if any(shots) else None
        pool = read_items(args.task, support) if support else []
        predictor = load(args.checkpoint, batch_size=args.batch_size)
        if not isinstance(predictor, CaptionPredictor):
            raise ValueError(f"{args.checkpoint} is a {predictor.kind}: --checkpoint takes a Flamingo checkpoint (a "
                             "CLIP goes in --clip, for rices)")
        names = class_names(args.data, queries, pool) if args.task == "classify" else []
        harness = FewShotEval(predictor, args.task, queries, pool, names, args.seed, args.trials)
        progress = sys.stderr.isatty()
        harness.check_images(progress)
        if rices:
            harness.embed(args.clip, args.index)
        rows = harness.run(shots, selects, args.batch_size, progress)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ValueError as e:  # FewShotError, CheckpointError, IndexFileError, DataLayoutError, a bad number included
        return _error(p.prog, str(e))
    result = {"task": args.task, "metric": METRICS[args.task], "checkpoint": args.checkpoint, "data": args.data,
              "support": support, "clip": args.clip, "index": args.index, "seed": args.seed, "trials": args.trials,
              "queries": len(harness.queries), "support_size": len(harness.support), "classes": names,
              "failed": harness.failed, "results": rows}  # fmt: skip
    print(json.dumps(result) if args.json else "\n".join(map(printable, format_table(result).splitlines())), flush=True)
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
        except OSError as e:
            print(f"{p.prog}: error: cannot write {printable(args.out)}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 1 if harness.failed else 0
