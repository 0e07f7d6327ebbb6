"""``serve``: the latency a user of ``vlm serve`` sees when many ask at once.

The server runs as a user starts it (``vlm serve --clip``, a fresh process on 127.0.0.1) on the default CPU
config's CLIP (untrained: the weights do not change the cost). Each ``/classify`` request goes over Gradio's plain
HTTP API as ``curl`` would send it (upload the image, join the queue, read the answer's event stream), timed from
the upload to the answer; ``gradio_client`` would cost some 0.15 s of client CPU per request here, more than the
server's work, and measure itself. Lone requests, one after another, give the median a user sees on an idle server;
requests sent all at once (released together by a barrier) give the 95th percentile under load; rounds of the two
alternate, so a slow spell of the machine lands on both. The goal is a p95 under load of at most 3x the lone p50 (a
ratio of at least 0.33). The full run also measures the same load on a server started with ``--max-batch 1`` (no
batching) and on a Gradio app with the same endpoint that does no work (:data:`FLOOR_APP`: what Gradio and HTTP
cost alone).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.core import Row, Settings, make_row, skip_row
from vlm.batching import percentile

SUITE = "serve"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A Gradio app with the same ``/classify`` endpoint (an uploaded file in, JSON out) that does no work: the cost of
# Gradio and HTTP alone, the floor under vlm serve's latency.
FLOOR_APP = """
import sys
import gradio as gr
with gr.Blocks() as app:
    upload, answer, go = gr.File(type="filepath"), gr.JSON(visible=False), gr.Button(visible=False)
    go.click(lambda path: {"predictions": []}, inputs=[upload], outputs=[answer], api_name="classify",
             concurrency_limit=None)
app.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""


def vlm_serve(ckpt: Path, labels: list[str], *options: str) -> list[str]:
    """The arguments after ``python`` that start ``vlm serve --clip ckpt`` (the port is appended)."""
    return ["-m", "vlm", "serve", "--clip", str(ckpt), "--labels", ",".join(labels), *options, "--port"]


@contextlib.contextmanager
def running_server(args: list[str], timeout: float = 180.0) -> Iterator[str]:
    """``python *args PORT`` with a free local port, with as many torch threads as this process
    (``scripts/benchmark.py --threads``), for the block; yields its URL once it answers; always stopped after."""
    import torch

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, *args, str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-500:]}")
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def classify_over_http(port: int, image: bytes) -> dict:
    """One ``/classify`` request to ``vlm serve`` on ``port`` over Gradio's HTTP API: the PNG bytes uploaded, the
    call queued, its answer read from the event stream; returns the answer (``predictions`` or ``error``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="image.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        (path,) = _answer(conn, "POST", "/gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")
        data = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}
        event = _answer(conn, "POST", "/gradio_api/call/classify", json.dumps(data).encode(), "application/json")
        conn.request("GET", f"/gradio_api/call/classify/{event['event_id']}")
        stream = conn.getresponse().read().decode()
    finally:
        conn.close()
    lines = stream.splitlines()
    for kind, data_line in zip(lines, lines[1:]):
        if kind == "event: complete" and data_line.startswith("data: "):
            return json.loads(data_line[len("data: "):])[0]
    raise RuntimeError(f"vlm serve answered {stream[-300:]!r}")


def _answer(conn: http.client.HTTPConnection, method: str, url: str, body: bytes, content_type: str):
    conn.request(method, url, body, {"Content-Type": content_type})
    response = conn.getresponse()
    text = response.read()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}: {text[-300:]!r}")
    return json.loads(text)


def latencies(url: str, image: str, lone: int, concurrent: int, rounds: int) -> tuple[list[float], list[float]]:
    """(lone latencies, latencies under load) in seconds: ``rounds`` of ``lone`` requests one after another, then
    ``concurrent`` at once."""
    port, data = int(url.rstrip("/").rsplit(":", 1)[1]), Path(image).read_bytes()

    def ask() -> float:
        start = time.perf_counter()
        answer = classify_over_http(port, data)
        if "predictions" not in answer:
            raise RuntimeError(f"vlm serve answered {answer}")
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: the first forwards
        ask()
    alone, loaded = [], []
    barrier = threading.Barrier(concurrent)

    def together() -> float:
        barrier.wait(timeout=60)
        return ask()

    with ThreadPoolExecutor(concurrent) as pool:
        for _ in range(rounds):
            alone.extend(ask() for _ in range(lone))
            loaded.extend(pool.map(lambda _: together(), range(concurrent), timeout=600))
    return alone, loaded


def run(settings: Settings) -> Iterator[Row]:
    from benchmarks.scripts import shapes_clip

    with shapes_clip(settings) as made:
        if made is None:
            yield skip_row(SUITE, "configs/clip/shapes.yaml does not exist")
            return
        yield from serve_rows(*made, settings)


def serve_rows(ckpt: Path, image: str, labels: list[str], settings: Settings) -> Iterator[Row]:
    """p95 latency of concurrent ``/classify`` requests against the p50 of a lone one (and, in the full run, the
    same load without batching)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        yield skip_row(SUITE, "vlm serve needs Gradio (pip install 'vlm[serve]')")
        return
    concurrent, lone, rounds = settings.pick(32, 4), settings.pick(10, 3), settings.pick(settings.repeats, 1)
    with running_server(vlm_serve(ckpt, labels)) as url:
        alone, loaded = latencies(url, image, lone, concurrent, rounds)
    p50, p95 = percentile(sorted(alone), 50), percentile(sorted(loaded), 95)
    name = f"vlm serve: p95 latency of {concurrent} concurrent classify requests"
    yield make_row(SUITE, f"{name} vs p50 of a lone request (goal: ratio >= 0.33)", 1000 * p95, "ms", 1000 * p50)
    if settings.quick:
        return
    with running_server(vlm_serve(ckpt, labels, "--max-batch", "1")) as url:
        _, unbatched = latencies(url, image, 1, concurrent, rounds)
    unbatched_p95 = percentile(sorted(unbatched), 95)
    yield make_row(SUITE, f"{name}, batched vs --max-batch 1", 1000 * p95, "ms", 1000 * unbatched_p95)
    with running_server(["-c", FLOOR_APP]) as url:
        floor_alone, floor = latencies(url, image, lone, concurrent, rounds)
    yield make_row(SUITE, f"{name} vs a Gradio app that does no work (the floor)", 1000 * p95, "ms",
                   1000 * percentile(sorted(floor), 95))
    yield make_row(SUITE, "vlm serve: p50 latency of a lone classify request vs the same no-work Gradio app",
                   1000 * p50, "ms", 1000 * percentile(sorted(floor_alone), 50))
