"""vlm serve under load: the micro-batcher alone (order, per-item errors, the largest batch), the latency log, the
page's functions from many threads, and the server answering 32 concurrent classify requests with batched forwards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import write_tiny_checkpoints

import vlm
from vlm.batching import LatencyLog, MicroBatcher, percentile
from vlm.data.shapes import make_sample
from vlm.serve import Demo

LABELS = ["red circle", "blue square", "green star", "yellow cross"]
# Batched and lone forwards differ only in float32 summation order (the matmuls block a batch of 1 and of n
# differently); on these 32-wide layers that moves a probability by a few ulps of 1.0, far below 1e-5.
PROB_TOL = 1e-5


def _blocked_batcher(max_batch: int, window_s: float = 0.0):
    """A batcher whose first batch waits for ``release`` (``entered`` is set once it does), so what is submitted
    meanwhile queues up; ``seen`` holds each batch as the function got it."""
    release, entered, seen = threading.Event(), threading.Event(), []

    def fn(items):
        if not seen:
            entered.set()
            release.wait(30)
        seen.append(list(items))
        return [RuntimeError(f"odd {x}") if x % 7 == 6 else 2 * x for x in items]

    return MicroBatcher(fn, max_batch=max_batch, window_s=window_s, name="test"), release, entered, seen


def _submit_in_order(batcher, items, pool, entered):
    """Submits ``items`` from ``pool``'s threads, each once the previous one is queued (arrival order = ``items``);
    the first is taken alone and blocks the worker."""
    futures = [pool.submit(batcher.submit, items[0])]
    assert entered.wait(30)
    deadline = time.monotonic() + 30
    for n, item in enumerate(items[1:], 1):
        futures.append(pool.submit(batcher.submit, item))
        while batcher._queue.qsize() < n and time.monotonic() < deadline:
            time.sleep(0.001)
    return futures


def test_the_batcher_keeps_arrival_order_and_the_largest_batch():
    batcher, release, entered, seen = _blocked_batcher(max_batch=8)
    with ThreadPoolExecutor(24) as pool:
        futures = _submit_in_order(batcher, list(range(20)), pool, entered)
        release.set()
        answers = [f.exception(30) or f.result() for f in futures]
    assert seen == [[0], list(range(1, 9)), list(range(9, 17)), [17, 18, 19]]  # in order, at most 8, none lost
    assert [str(a) if isinstance(a, Exception) else a for a in answers] == [
        "odd 6" if x == 6 else "odd 13" if x == 13 else 2 * x for x in range(20)]  # fmt: skip
    stats = batcher.stats()
    assert (stats.batches, stats.items, stats.largest) == (4, 20, 8)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_a_failing_batch_is_run_item_by_item_so_only_the_bad_item_fails():
    calls = []

    def fn(items):
        calls.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError(f"negative: {[x for x in items if x < 0]}")
        return [x + 1 for x in items]

    batcher = MicroBatcher(fn, max_batch=16, window_s=0.3)
    with ThreadPoolExecutor(6) as pool:
        futures = {x: pool.submit(batcher.submit, x) for x in (1, 2, -3, 4, 5)}
        with pytest.raises(ValueError, match=r"negative: \[-3\]"):
            futures[-3].result(30)
        assert {x: f.result(30) for x, f in futures.items() if x != -3} == {1: 2, 2: 3, 4: 5, 5: 6}
    assert max(map(len, calls)) > 1 and [-3] in calls  # batched first, then the bad one alone
    batcher.close()


def test_a_wrong_number_of_results_is_not_handed_out():
    batcher = MicroBatcher(lambda items: [0] * (len(items) + 1), max_batch=4, window_s=0.0)
    with pytest.raises(RuntimeError, match="2 results for 1 items"):
        batcher.submit(1)
    batcher.close()


def test_close_answers_what_is_queued():
    batcher, release, entered, seen = _blocked_batcher(max_batch=4)
    with ThreadPoolExecutor(4) as pool:
        futures = _submit_in_order(batcher, [1, 2, 3], pool, entered)
        closing = pool.submit(batcher.close)
        release.set()
        closing.result(30)
        assert [f.result(30) for f in futures] == [2, 4, 6]


def test_latency_log_lines(caplog):
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile(list(range(1, 101)), 95) == 95
    logger = logging.getLogger("vlm.test_latency")
    latency = LatencyLog(logger, every=100, extra=lambda: "more words")
    with caplog.at_level(logging.INFO, logger="vlm.test_latency"):
        for ms in range(1, 101):
            latency.record("classify", ms / 1000)
        latency.record("caption", 0.5)
        with latency.timed("search"):
            pass
        latency.close()
        latency.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "latency, last 100 request(s): classify 100 request(s) p50 50.0 ms p95 95.0 ms; more words",
        lines[1],
    ] and lines[1].startswith("latency, whole run: caption 1 request(s) p50 500.0 ms p95 500.0 ms; "
                              "classify 100 request(s) p50 50.0 ms p95 95.0 ms; search 1 request(s)")
    assert latency.summary("classify") == (100, 0.05, 0.095)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-load")
    out = write_tiny_checkpoints(tmp)
    out["images"] = []
    for i in range(4):
        out["images"].append(tmp / f"shape{i}.png")
        make_sample(0, "validation", i, image_size=32)[0].save(out["images"][-1])
    out["bad"] = tmp / "bad.png"
    out["bad"].write_bytes(b"this is not an image")
    return out


def _expected(files) -> dict[str, list[tuple[str, float]]]:
    clip = vlm.load(files["clip"])
    return {str(p): clip.classify(str(p), LABELS, top_k=5)[0] for p in files["images"]}


def _same(predictions: list[dict], expected: list[tuple[str, float]]) -> bool:
    return ([p["label"] for p in predictions] == [label for label, _ in expected]
            and all(abs(p["prob"] - prob) <= PROB_TOL for p, (_, prob) in zip(predictions, expected)))


def test_the_page_functions_batch_requests_from_many_threads(files):
    demo = Demo(vlm.load(files["clip"]), labels=LABELS, max_batch=4, batch_window_ms=200)
    expected = _expected(files)
    paths = [str(files["images"][i % 4]) for i in range(10)] + [str(files["bad"])]
    try:
        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(demo.classify, paths, timeout=120))
    finally:
        demo.close()
    assert all(_same(a["predictions"], expected[p]) for p, a in zip(paths[:-1], answers[:-1])), answers
    assert "not an image" in answers[-1]["error"]
    stats = demo.classifier.stats()
    assert stats.items == 10 and 1 < stats.largest <= 4
    assert demo.latency.summary("classify")[0] == 11


def test_a_slow_caption_does_not_hold_up_classify(files):
    release, started = threading.Event(), threading.Event()

    class SlowCaptioner:  # stands in for a caption with many beams
        def caption(self, images):
            started.set()
            release.wait(60)
            return ["slow"] * len(images)

    demo = Demo(vlm.load(files["clip"]), SlowCaptioner(), labels=LABELS, batch_window_ms=0)
    path = str(files["images"][0])
    try:
        with ThreadPoolExecutor(2) as pool:
            caption = pool.submit(demo.describe, path)
            assert started.wait(30)
            answer = demo.classify(path)  # answered while the caption is still running
            # had classify waited behind the caption, it would return only after the caption's 60 s wait ran out
            assert not caption.done()
            release.set()
            assert caption.result(30) == "slow"
    finally:
        release.set()
        demo.close()
    assert _same(answer["predictions"], _expected(files)[path])


# ------------------------------------------------------------------------------------------------ the server
def _wait_for(url: str, proc: subprocess.Popen, log_path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlm serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"vlm serve did not answer within {seconds} s: {log_path.read_text()[-2000:]}")


def test_32_concurrent_classify_requests_are_batched_and_all_answered(files, tmp_path):
    from gradio_client import Client, handle_file
    from test_serve import _free_port

    port, log_path = _free_port(), tmp_path / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}  # the CPUs are shared
    args = [sys.executable, "-m", "vlm", "serve", "--clip", str(files["clip"]), "--labels", ",".join(LABELS),
            "--port", str(port), "--max-batch", "8", "--batch-window-ms", "100", "--latency-every", "1000"]
    expected = _expected(files)
    paths = [str(files["images"][i % 4]) for i in range(32)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_for(url, proc, log_path)
            client = Client(url, verbose=False)
            jobs = [client.submit(handle_file(p), api_name="/classify") for p in [*paths, str(files["bad"])]]
            answers = [job.result(timeout=180) for job in jobs]
            # the page still answers afterwards, with the labels and the heat map
            shown, probs, heat, status = client.predict(handle_file(paths[0]), api_name="/look")
            assert status == "Done." and probs["label"] == expected[paths[0]][0][0]
            assert urllib.request.urlopen(url, timeout=10).status == 200
        finally:
            proc.terminate()  # SIGTERM: the server closes as on Ctrl-C and logs the whole run
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    text = log_path.read_text()
    wrong = [(p, a) for p, a in zip(paths, answers) if not _same(a.get("predictions", []), expected[p])]
    assert len(answers) == 33 and wrong == [], wrong[:3]
    assert "not an image" in answers[-1]["error"]
    (line,) = [line for line in text.splitlines() if "latency, whole run" in line]
    assert "classify 33 request(s) p50" in line and "labels 1 request(s)" in line, line
    largest = int(line.split("classify batches ")[1].split("largest ")[1].split(",")[0])
    assert 1 < largest <= 8, line  # at least one forward served several requests, none more than --max-batch


@pytest.mark.parametrize("option", [["--max-batch", "0"], ["--batch-window-ms", "-1"], ["--latency-every", "0"]])
def test_batching_options_out_of_range_are_a_usage_error(files, option, capsys):
    from vlm.__main__ import main

    assert main(["serve", "--clip", str(files["clip"]), "--labels", "a,b", *option]) == 2
    assert "--max-batch must be in 1..256" in capsys.readouterr().err
