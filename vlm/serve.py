"""``vlm serve``: a web page over trained models (Gradio), bound to 127.0.0.1 unless told otherwise.

    vlm serve --clip runs/clip-scenes/checkpoints/last.ckpt --captioner runs/flamingo/checkpoints/last.ckpt \\
        --labels-file data/shapes/classnames.txt --index shapes.index --images data/shapes/validation --port 7860

Upload an image (or pick an example): the CLIP model's top labels as bars, the heat map of where it found the top
label, the captioner's caption; type a query to search an index made by ``vlm index``. An upload that is not an
image, is truncated, is too large (bytes, or pixels: :func:`vlm.data.images.load_image`'s budget, checked from the
header before anything is decoded) gets a message in the page; the server carries on.

An index is a file like any other: it names its own folder and files. The page shows a search result only when its
real path (symbolic links resolved) lies under the folder given with ``--images`` on the command line; any other is
dropped with one ``vlm serve: dropped ...`` line on stderr, and ``--index`` without ``--images`` is refused at start.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm.data.files import UnsafeFileError, check_regular
from vlm.inputs import printable, read_labels

DEFAULT_PORT = 7860
DISPLAY_SIZE = 256  # small images (the shapes are 64 px) are shown enlarged, pixels kept sharp
SHOWN_SIDE = 2 * DISPLAY_SIZE  # larger images (uploads, matches) are shown reduced to this, heat map included


class Demo:
    """What the page calls: the loaded models and the functions behind each button (usable without a browser).

    Args:
        clip: a CLIP predictor (labels, heat maps, search), or None.
        captioner: a Flamingo predictor (captions), or None.
        index: a :class:`vlm.index.ImageIndex` to search, or None.
        labels: the classes the CLIP model ranks.
        max_upload_bytes: the largest upload read.
        top_k: labels and search matches shown.
        images: the folder search results must lie in (real paths compared); default: the index's own folder,
            which only a caller that trusts the index should rely on (``vlm serve`` always passes its ``--images``).
    """

    def __init__(self, clip: Any = None, captioner: Any = None, index: Any = None, labels: Sequence[str] = (),
                 max_upload_bytes: int = 20 << 20, top_k: int = 5, images: str | os.PathLike | None = None) -> None:
        self.clip, self.captioner, self.index = clip, captioner, index
        self.labels = list(labels)
        self.max_upload_bytes = max_upload_bytes
        self.top_k = top_k
        folder = images if images is not None else (index.root if index is not None else None)
        self.images = Path(os.path.realpath(folder)) if folder is not None else None

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

    def analyse(self, path: str | None) -> tuple[Any, Any, str, Any, str]:
        """An uploaded file -> (image shown, label probabilities, caption, heat map, status message)."""
        from PIL import Image

        from vlm.explain.render import overlay

        try:
            image = self._read(path)
        except (ValueError, OSError) as e:
            return None, None, "", None, f"**Error:** {printable(str(e))}"
        scale = max(1, DISPLAY_SIZE // max(image.size))
        if scale > 1:
            shown = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        else:  # a large upload is shown (and its heat map drawn) reduced
            shown = image.copy()
            shown.thumbnail((SHOWN_SIDE, SHOWN_SIDE))
        probs, heat, caption = None, None, ""
        if self.clip is not None and self.labels:
            top = self.clip.classify(image, self.labels, top_k=self.top_k)[0]
            probs = dict(top)
            exp = self.clip.explain(image, [top[0][0]])[0]
            heat = overlay(shown, exp.labels[top[0][0]])
        if self.captioner is not None:
            caption = self.captioner.caption(image)[0]
        return shown, probs, caption, heat, "Done."

    def search(self, query: str) -> tuple[list, str]:
        """A text query -> (gallery of (image, "score name"), status message)."""
        from vlm.data.images import ImageLoadError, load_image
        from vlm.index import search

        if self.index is None:
            return [], "No index: start the server with --index INDEX (made by vlm index)."
        if not query or not query.strip():
            return [], "Type what to look for, e.g. 'a small red circle'."
        results = []
        for path, score in search(self.index, self.clip, query.strip(), self.top_k):
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


def build_app(demo: Demo, examples: Sequence[str] = ()):
    """The Gradio page over ``demo``."""
    import gradio as gr

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
                probs = gr.Label(label="labels", num_top_classes=demo.top_k, elem_id="labels")
        upload.change(demo.analyse, inputs=[upload], outputs=[shown, probs, caption, heat, status])
        if demo.index is not None:
            gr.Markdown("## Search the indexed images")
            with gr.Row():
                query = gr.Textbox(label="query", placeholder="a small red circle", elem_id="query")
                go = gr.Button("Search", elem_id="search")
            found = gr.Gallery(label="matches", columns=5, elem_id="matches")
            said = gr.Markdown(elem_id="search-status")
            go.click(demo.search, inputs=[query], outputs=[found, said])
            query.submit(demo.search, inputs=[query], outputs=[found, said])
    return app


def serve_main(argv: list[str] | None = None) -> int:
    """``vlm serve``; returns the exit code (2 for a usage error or a refused checkpoint)."""
    parser = argparse.ArgumentParser(prog="vlm serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", help="a CLIP checkpoint or export (labels, heat maps, search)")
    parser.add_argument("--captioner", help="a Flamingo checkpoint or export (captions)")
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def fail(message: str) -> int:
        print(f"vlm serve: error: {printable(message)}", file=sys.stderr)
        return 2

    if not (args.clip or args.captioner):
        return fail("give --clip and/or --captioner")
    if args.index and not args.clip:
        return fail("--index needs --clip (the model that embeds the query)")
    if not 1 <= args.port <= 65535 or not 1 <= args.max_upload_mb <= 1024:
        return fail("--port must be in 1..65535 and --max-upload-mb in 1..1024")
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
    except (CheckpointError, UnsafeFileError, ValueError, OSError) as e:
        return fail(str(e))
    try:
        import gradio  # noqa: F401
    except ImportError:
        return fail("the web page needs Gradio: pip install 'vlm[serve]'")
    demo = Demo(clip, captioner, index, names, args.max_upload_mb << 20, images=args.images)
    app = build_app(demo, args.examples)
    print(f"vlm serve: http://{args.host}:{args.port}", flush=True)
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, show_error=True,
                                                  max_file_size=f"{args.max_upload_mb}mb", quiet=True)
    return 0


__all__ = ["Demo", "build_app", "serve_main"]
