"""``vlm serve``: a web page over trained models (Gradio), bound to 127.0.0.1 unless told otherwise.

    vlm serve --clip runs/clip-scenes/checkpoints/last.ckpt --captioner runs/flamingo/checkpoints/last.ckpt \\
        --labels-file data/shapes/classnames.txt --index shapes.index --images data/shapes/validation --port 7860

Upload an image (or pick an example): the CLIP model's top labels as bars, the heat map of where it found the top
label, the captioner's caption; ask the captioner a question about the image (a short answer, as
``vlm.load(ckpt).answer`` gives it); type a query to search an index made by ``vlm index``. An upload that is not an
image, is truncated, is too large (bytes, or pixels: :func:`vlm.data.images.load_image`'s budget, checked from the
header before anything is decoded) gets a message in the page; the server carries on.

An index is a file like any other: it names its own folder and files. The page shows a search result only when its
real path (symbolic links resolved) lies under the folder given with ``--images`` on the command line; any other is
dropped with one ``vlm serve: dropped ...`` line on stderr, and ``--index`` without ``--images`` is refused at start.

Requests that arrive together share a forward: classify requests (the page's labels and the ``/classify`` API),
captions and questions each go through a :class:`vlm.batching.MicroBatcher` (``--max-batch``, ``--batch-window-ms``),
and each kind has its own workers, so a slow caption never holds up the labels. Calls on the CLIP model are serialised
by a lock (the heat map records attention on the shared model; the classifier cache is shared), and so are calls on
the captioner (a caption batch and an answer batch take turns). The median and 95th percentile latency of each kind
of request are logged (``--latency-every`` requests or 60 s, and at shutdown).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm.batching import LatencyLog, MicroBatcher
from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import printable, read_labels

DEFAULT_PORT = 7860
DISPLAY_SIZE = 256  # small images (the shapes are 64 px) are shown enlarged, pixels kept sharp
SHOWN_SIDE = 2 * DISPLAY_SIZE  # larger images (uploads, matches) are shown reduced to this, heat map included
MAX_QUESTION_CHARS = 1000  # a question longer than this is refused before it is tokenized
log = logging.getLogger("vlm.serve")


class Demo:
    """What the page calls: the loaded models and the functions behind each button (usable without a browser).

    Classify requests, captions and questions from many threads are batched (:class:`vlm.batching.MicroBatcher`);
    each call is timed into :attr:`latency`. :meth:`close` stops the batchers and logs the whole run's latencies.

    Args:
        clip: a CLIP predictor (labels, heat maps, search), or None.
        captioner: a Flamingo predictor (captions, answers to questions), or None.
        index: a :class:`vlm.index.ImageIndex` to search, or None.
        labels: the classes the CLIP model ranks.
        max_upload_bytes: the largest upload read.
        top_k: labels and search matches shown.
        images: the folder search results must lie in (real paths compared); default: the index's own folder,
            which only a caller that trusts the index should rely on (``vlm serve`` always passes its ``--images``).
        max_batch: the most requests of one kind run as one forward.
        batch_window_ms: how long the first request of a batch waits for others to join it.
        latency_every: requests between two latency lines on the ``vlm.serve`` logger (or 60 s).
    """

    def __init__(self, clip: Any = None, captioner: Any = None, index: Any = None, labels: Sequence[str] = (),
                 max_upload_bytes: int = 20 << 20, top_k: int = 5, images: str | os.PathLike | None = None,
                 max_batch: int = 16, batch_window_ms: float = 10.0, latency_every: int = 100) -> None:
        self.clip, self.captioner, self.index = clip, captioner, index
        self.labels = list(labels)
        self.max_upload_bytes = max_upload_bytes
        self.top_k = top_k
        folder = images if images is not None else (index.root if index is not None else None)
        self.images = Path(os.path.realpath(folder)) if folder is not None else None
        # One CLIP call at a time: a heat map records attention inside the shared model, and the classifier cache
        # is shared. Classify requests are batched, so they queue behind one forward, not one each.
        self._clip_lock = threading.Lock()
        self.classifier = MicroBatcher(self._classify_batch, max_batch, batch_window_ms / 1000, "classify")
        # Captions and answers have a batcher each (concurrent questions share a forward) and take turns on the model.
        self._captioner_lock = threading.Lock()
        self.captions = MicroBatcher(self._caption_batch, max_batch, batch_window_ms / 1000, "caption")
        self.answers = MicroBatcher(self._answer_batch, max_batch, batch_window_ms / 1000, "answer")
        self.latency = LatencyLog(log, every=latency_every, extra=self.batch_summary)

    def _shown_here(self, path: str | os.PathLike) -> bool:
        """Whether ``path``, symbolic links resolved, lies under :attr:`images`."""
        return self.images is not None and Path(os.path.realpath(path)).is_relative_to(self.images)

    def _read(self, path: str | None):
        from vlm.data.images import ImageLoadError, load_image

        if not path:
            raise ValueError("no image: upload one or pick an example")
        size = os.stat(path).st_size
        if size > self.max_upload_bytes:
            raise ValueError(f"the upload is {size / 2**20:.1f} MiB; "
                             f"the limit is {self.max_upload_bytes / 2**20:.0f} MiB")
        try:
            return load_image(path)
        except ImageLoadError as e:
            raise ValueError(f"cannot read the upload: {e.reason}") from None

    # ------------------------------------------------------------------------------------------------ batches
    def _classify_batch(self, items: list[tuple[Any, tuple[str, ...]]]) -> list[list[tuple[str, float]]]:
        """(image, labels) pairs -> each image's top labels: one forward per label set."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, (_, labels) in enumerate(items):
            groups.setdefault(labels, []).append(i)
        with self._clip_lock:
            for labels, where in groups.items():
                tops = self.clip.classify([items[i][0] for i in where], list(labels), top_k=self.top_k)
                for i, top in zip(where, tops):
                    out[i] = top
        return out

    def _caption_batch(self, images: list[Any]) -> list[str]:
        with self._captioner_lock:
            return self.captioner.caption(images)

    def _answer_batch(self, items: list[tuple[Any, str]]) -> list[str]:
        """(image, question) pairs -> one answer each, in one call (each image asked its own question)."""
        with self._captioner_lock:
            return self.captioner.answer([image for image, _ in items], [question for _, question in items])

    def top_labels(self, image: Any) -> list[tuple[str, float]]:
        """A decoded image's top labels, best first, batched with the other requests that arrive with it."""
        return self.classifier.submit((image, tuple(self.labels)))

    def batch_summary(self) -> str:
        """How the batches went so far, for the latency lines."""
        stats = [(b.name, b.stats()) for b in (self.classifier, self.captions, self.answers)]
        return "; ".join(f"{name} batches {s.batches} (largest {s.largest}, mean {s.mean:.1f})"
                         for name, s in stats if s.batches)  # fmt: skip

    def close(self) -> None:
        """Answers what is queued, stops the batch workers and logs the whole run's latencies."""
        self.classifier.close()
        self.captions.close()
        self.answers.close()
        self.latency.close()

    # ------------------------------------------------------------------------------------------------ requests
    def classify(self, path: str | None) -> dict[str, Any]:
        """An uploaded file -> ``{"predictions": [{"label", "prob"}, ...]}`` best first, or ``{"error": message}``
        (the ``/classify`` API: one request's failure is its own answer)."""
        with self.latency.timed("classify"):
            if self.clip is None or not self.labels:
                return {"error": "this server has no CLIP model (--clip) or no labels"}
            try:
                top = self.top_labels(self._read(path))
            except Exception as e:  # noqa: BLE001 - the request gets its error; the server carries on
                if not isinstance(e, ValueError | OSError):
                    log.warning("classify failed: %s: %s", type(e).__name__, e)
                return {"error": printable(str(e))}
            return {"predictions": [{"label": label, "prob": prob} for label, prob in top]}

    def look(self, path: str | None) -> tuple[Any, Any, Any, str]:
        """An uploaded file -> (image shown, label probabilities, heat map, status message)."""
        from PIL import Image

        from vlm.explain.render import overlay

        with self.latency.timed("labels"):
            try:
                image = self._read(path)
            except (ValueError, OSError) as e:
                return None, None, None, f"**Error:** {printable(str(e))}"
            scale = max(1, DISPLAY_SIZE // max(image.size))
            if scale > 1:
                shown = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            else:  # a large upload is shown (and its heat map drawn) reduced
                shown = image.copy()
                shown.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
            probs, heat = None, None
            if self.clip is not None and self.labels:
                top = self.top_labels(image)
                probs = dict(top)
                with self._clip_lock:
                    exp = self.clip.explain(image, [top[0][0]])[0]
                heat = overlay(shown, exp.labels[top[0][0]])
            return shown, probs, heat, "Done."

    def describe(self, path: str | None) -> str:
        """An uploaded file -> its caption ("" without a captioner or a readable upload: :meth:`look` says why)."""
        if self.captioner is None:
            return ""
        with self.latency.timed("caption"):
            try:
                image = self._read(path)
            except (ValueError, OSError):
                return ""
            return self.captions.submit(image)

    def analyse(self, path: str | None) -> tuple[Any, Any, str, Any, str]:
        """An uploaded file -> (image shown, label probabilities, caption, heat map, status message)."""
        shown, probs, heat, status = self.look(path)
        return shown, probs, self.describe(path) if shown is not None else "", heat, status

    def ask(self, path: str | None, question: str | None) -> str:
        """An uploaded file and a question about it -> the captioner's short answer (batched with the questions that
        arrive with it), or a message saying what is wrong: no captioner, no question, no readable image."""
        if self.captioner is None:
            return "No captioner: start the server with --captioner CKPT (a Flamingo checkpoint) to ask questions."
        with self.latency.timed("answer"):
            question = " ".join((question or "").split())
            if not question:
                return "Type a question about the image, e.g. 'what colour is the star?'."
            if len(question) > MAX_QUESTION_CHARS:
                return f"Error: the question is {len(question):,} characters long; at most {MAX_QUESTION_CHARS:,}."
            try:
                return self.answers.submit((self._read(path), question))
            except Exception as e:  # noqa: BLE001 - the request gets its error; the server carries on
                if not isinstance(e, ValueError | OSError):
                    log.warning("answer failed: %s: %s", type(e).__name__, e)
                return f"Error: {printable(str(e))}"

    def search(self, query: str) -> tuple[list, str]:
        """A text query -> (gallery of (image, "score name"), status message)."""
        with self.latency.timed("search"):
            return self._search(query)

    def _search(self, query: str) -> tuple[list, str]:
        from vlm.data.images import ImageLoadError, load_image
        from vlm.index import search

        if self.index is None:
            return [], "No index: start the server with --index INDEX (made by vlm index)."
        if not query or not query.strip():
            return [], "Type what to look for, e.g. 'a small red circle'."
        with self._clip_lock:
            matches = search(self.index, self.clip, query.strip(), self.top_k)
        results = []
        for path, score in matches:
            if not self._shown_here(path):  # a file the index names outside the served folder is never read
                print(f"vlm serve: dropped a search result outside --images {printable(str(self.images))}: "
                      f"{printable(str(path))}", file=sys.stderr, flush=True)
                continue
            try:
                image = load_image(path)
            except ImageLoadError as e:
                results.append((None, f"{Path(path).name}: {e.reason}"))
                continue
            image.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
            results.append((image, f"{score:.3f} {Path(path).name}"))
        return [r for r in results if r[0] is not None], f"{len(results)} result(s) for '{printable(query)}'."


def concurrency(demo: Demo) -> int:
    """Requests of one batched kind in flight at once: a batch running and the next one filling."""
    return 2 * demo.classifier.max_batch


def build_app(demo: Demo, examples: Sequence[str] = ()):
    """The Gradio page over ``demo``: each kind of request (labels, caption, question, ``/classify``, search) has its
    own workers, so a slow one does not hold up the others."""
    import gradio as gr

    limit = concurrency(demo)

    with gr.Blocks(title="vlm") as app:
        gr.Markdown("# vlm\nUpload an image: the CLIP model's labels, where it looks, and a caption.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", file_types=["image"], type="filepath", elem_id="upload")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="examples")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    shown = gr.Image(label="image", interactive=False, height=DISPLAY_SIZE, elem_id="shown")
                    heat = gr.Image(label="where the top label is", interactive=False, height=DISPLAY_SIZE,
                                    elem_id="heatmap")
                caption = gr.Textbox(label="caption", interactive=False, elem_id="caption")
                if demo.captioner is not None:  # a question about the uploaded image, answered by the captioner
                    with gr.Row():
                        question = gr.Textbox(label="question", placeholder="what colour is the star?",
                                              elem_id="question", scale=4)
                        ask = gr.Button("Ask", elem_id="ask", scale=1)
                    reply = gr.Textbox(label="answer", interactive=False, elem_id="answer")
                probs = gr.Label(label="labels", num_top_classes=demo.top_k, elem_id="labels")
        upload.change(demo.look, inputs=[upload], outputs=[shown, probs, heat, status], concurrency_limit=limit)
        if demo.captioner is not None:
            upload.change(demo.describe, inputs=[upload], outputs=[caption], concurrency_limit=limit)
            gr.on([ask.click, question.submit], demo.ask, inputs=[upload, question], outputs=[reply],
                  api_name="answer", concurrency_limit=limit)
        if demo.clip is not None:  # the API alone: labels as JSON, no heat map
            answer, classify = gr.JSON(visible=False), gr.Button(visible=False)
            classify.click(demo.classify, inputs=[upload], outputs=[answer], api_name="classify",
                           concurrency_limit=limit)
        if demo.index is not None:
            gr.Markdown("## Search the indexed images")
            with gr.Row():
                query = gr.Textbox(label="query", placeholder="a small red circle", elem_id="query")
                go = gr.Button("Search", elem_id="search")
            found = gr.Gallery(label="matches", columns=5, elem_id="matches")
            said = gr.Markdown(elem_id="search-status")
            gr.on([go.click, query.submit], demo.search, inputs=[query], outputs=[found, said], concurrency_limit=2)
    return app


def serve_main(argv: list[str] | None = None) -> int:
    """``vlm serve``; returns the exit code (2 for a usage error or a refused checkpoint)."""
    parser = argparse.ArgumentParser(prog="vlm serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", help="a CLIP checkpoint or export (labels, heat maps, search)")
    parser.add_argument("--captioner", help="a Flamingo checkpoint or export (captions, questions)")
    parser.add_argument("--rerank", action="store_true",
                        help="captions picked by --clip among the captioner's 8 best beam-search captions (the "
                        "own-data CLIP stage names attribute pairs its captioner never saw)")
    parser.add_argument("--index", help="an index made by vlm index (search); needs --images")
    parser.add_argument("--images", metavar="DIR",
                        help="the folder the index was built from: the page shows only search results whose real "
                        "path lies under it (required with --index)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names")
    labels.add_argument("--labels-file", help="file with one class name per line")
    parser.add_argument("--examples", nargs="*", default=[], help="example images shown under the upload")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--max-upload-mb", type=int, default=20, help="largest upload accepted (default 20)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most classify (or caption) requests run as one forward (default 16; 1: no batching)")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a request waits for others to share its forward (default 10)")
    parser.add_argument("--latency-every", type=int, default=100, metavar="N",
                        help="log p50/p95 latency per request kind every N requests or 60 s (default 100)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def fail(message: str) -> int:
        print(f"vlm serve: error: {printable(message)}", file=sys.stderr)
        return 2

    if not (args.clip or args.captioner):
        return fail("give --clip and/or --captioner")
    if args.rerank and not (args.clip and args.captioner):
        return fail("--rerank needs --clip (the model that picks) and --captioner (the one that proposes)")
    if args.index and not args.clip:
        return fail("--index needs --clip (the model that embeds the query)")
    if not 1 <= args.port <= 65535 or not 1 <= args.max_upload_mb <= 1024:
        return fail("--port must be in 1..65535 and --max-upload-mb in 1..1024")
    if not 1 <= args.max_batch <= 256 or not 0 <= args.batch_window_ms <= 1000 or args.latency_every < 1:
        return fail("--max-batch must be in 1..256, --batch-window-ms in 0..1000 and --latency-every at least 1")
    from vlm.formats import CheckpointError
    from vlm.inference import CaptionPredictor, CLIPPredictor, load

    try:
        names = read_labels(args.labels, args.labels_file) if (args.labels or args.labels_file) else []
        if args.clip and not names:
            raise ValueError("--clip needs --labels or --labels-file (the classes to rank)")
        for path in filter(None, (args.clip, args.captioner)):
            check_regular(path, "checkpoint", directory_ok=True)
        index = None
        if args.index:  # before the models load: a wrong index or a missing --images is refused at once
            from vlm.index import fingerprint, load_index

            index = load_index(args.index)
            if fingerprint(args.clip) != index.fingerprint:
                raise ValueError(f"{args.index} was built with another checkpoint ({index.checkpoint}) than --clip "
                                 f"{args.clip}: rebuild it with vlm index --rebuild")
            if not args.images:  # the index names its own folder; only the command line says what may be shown
                raise ValueError("--index needs --images DIR, the folder the index was built from: the page shows "
                                 "only images under it")
            if not os.path.isdir(args.images):
                raise ValueError(f"--images {args.images} is not a folder")
            if not Path(os.path.realpath(index.root)).is_relative_to(os.path.realpath(args.images)):
                raise ValueError(f"{args.index} indexes {index.root}, which is not under --images {args.images}")
        clip = load(args.clip) if args.clip else None
        captioner = load(args.captioner) if args.captioner else None
        if clip is not None and not isinstance(clip, CLIPPredictor):
            raise ValueError(f"--clip {args.clip} is a {clip.kind}")
        if captioner is not None and not isinstance(captioner, CaptionPredictor):
            raise ValueError(f"--captioner {args.captioner} is a {captioner.kind}")
        if args.rerank:
            captioner.rerank_with(clip)
    except (CheckpointError, UnsafeFileError, ValueError, OSError) as e:
        return fail(str(e))
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail("the web page needs Gradio: pip install 'vlm[serve]'")
    if not log.handlers:  # the latency lines go to stderr beside the server's other messages
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vlm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    demo = Demo(clip, captioner, index, names, args.max_upload_mb << 20, images=args.images, max_batch=args.max_batch,
                batch_window_ms=args.batch_window_ms, latency_every=args.latency_every)
    app = build_app(demo, args.examples)
    print(f"vlm serve: http://{args.host}:{args.port}", flush=True)
    # SIGTERM stops the server as Ctrl-C does (Gradio closes it on KeyboardInterrupt), so the last latencies are logged
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, show_error=True, max_file_size=f"{args.max_upload_mb}mb",
            quiet=True, max_threads=3 * concurrency(demo) + 8)  # threads for every kind's workers, and spare
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        demo.close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


__all__ = ["Demo", "build_app", "serve_main"]
