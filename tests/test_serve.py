"""vlm serve: the page's functions on bad uploads, and the page itself driven by a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import write_tiny_checkpoints

import vlm
from vlm.__main__ import main
from vlm.data.shapes import make_sample
from vlm.index import build_index, load_index, search
from vlm.serve import Demo

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
LABELS = ["red circle", "blue square", "green star", "yellow cross"]
QUESTION = "what colour is the star?"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    out = write_tiny_checkpoints(tmp)
    image, _ = make_sample(0, "validation", 0, image_size=32)
    out["image"] = tmp / "shape.png"
    image.save(out["image"])
    out["bad"] = tmp / "bad.png"
    out["bad"].write_bytes(b"this is not an image")
    data = out["image"].read_bytes()
    out["truncated"] = tmp / "truncated.png"
    out["truncated"].write_bytes(data[: len(data) // 2])
    gallery = tmp / "gallery"
    gallery.mkdir()
    for i in range(4):
        make_sample(0, "validation", i, image_size=32)[0].save(gallery / f"{i}.png")
    out["index"] = tmp / "gallery.index"
    build_index(out["clip"], gallery, out["index"], progress=False)
    return out


def test_bad_uploads_get_a_message_and_the_next_one_works(files):
    demo = Demo(vlm.load(files["clip"]), vlm.load(files["flamingo"]), labels=LABELS, max_upload_bytes=1 << 20)
    for path, words in ((files["bad"], "not an image"), (files["truncated"], "truncated"), (None, "no image")):
        shown, probs, caption, heat, status = demo.analyse(str(path) if path else None)
        assert shown is None and probs is None and caption == "" and words in status and "Error" in status
    demo.max_upload_bytes = 100
    assert "limit" in demo.analyse(str(files["image"]))[4]
    demo.max_upload_bytes = 1 << 20
    shown, probs, caption, heat, status = demo.analyse(str(files["image"]))
    assert status == "Done." and shown.size == heat.size
    expected = vlm.load(files["clip"]).classify(str(files["image"]), LABELS, top_k=5)[0]
    assert list(probs) == [label for label, _ in expected]
    assert caption == vlm.load(files["flamingo"]).caption(str(files["image"]))[0]


def test_questions_are_answered_as_the_predictor_answers_them_and_batched(files):
    flamingo = vlm.load(files["flamingo"])
    gallery = [str(files["index"].parent / "gallery" / f"{i}.png") for i in range(2)]
    expected = flamingo.answer(gallery, QUESTION)
    assert all(expected) and expected[0] != expected[1]  # each caller must get its own image's answer
    demo = Demo(captioner=flamingo, max_batch=4, batch_window_ms=200, max_upload_bytes=1 << 20)
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(demo.ask, [gallery[i % 2] for i in range(6)], [QUESTION] * 6, timeout=120))
        assert answers == [expected[i % 2] for i in range(6)]
        assert 1 < demo.answers.stats().largest <= 4 and demo.answers.stats().items == 6  # questions shared forwards
        assert demo.ask(gallery[0], "  what colour\n is the star? ") == expected[0]  # white space as training reads it
        for path, question, words in ((None, QUESTION, "no image"), (files["bad"], QUESTION, "not an image"),
                                      (gallery[0], "  ", "Type a question"), (gallery[0], None, "Type a question"),
                                      (gallery[0], "what colour? " * 30, "context is 24 tokens"),
                                      (gallery[0], "x" * 1001, "at most 1,000")):
            said = demo.ask(str(path) if path else None, question)
            assert words in said and said not in expected, said
    finally:
        demo.close()
    assert demo.latency.summary("answer")[0] == 13
    said = Demo(vlm.load(files["clip"]), labels=LABELS).ask(gallery[0], QUESTION)
    assert "No captioner" in said and "--captioner" in said


def test_search_without_an_index_says_how_to_get_one(files):
    found, said = Demo(vlm.load(files["clip"]), labels=LABELS).search("a red circle")
    assert found == [] and "--index" in said


def test_search_shows_the_index_matches_in_order(files):
    clip, index = vlm.load(files["clip"]), load_index(files["index"])
    found, said = Demo(clip, index=index, labels=LABELS, top_k=3).search("a red circle")
    expected = search(index, clip, "a red circle", 3)
    assert [name.split(" ")[1] for _, name in found] == [p.name for p, _ in expected] and "3 result(s)" in said
    assert Demo(clip, index=index, labels=LABELS).search("  ")[0] == []


def test_an_index_of_another_model_is_refused_at_start(files, tmp_path, capsys):
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(files["clip"], weights_only=True)
    ckpt["state_dict"] = {k: v + 1 for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other)
    code = main(["serve", "--clip", str(other), "--labels", "a,b", "--index", str(files["index"])])
    assert code == 2 and "built with another checkpoint" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(files, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm", "serve", "--clip", str(files["clip"]), "--captioner", str(files["flamingo"]),
         "--labels", ",".join(LABELS), "--index", str(files["index"]),
         "--images", str(files["index"].parent / "gallery"), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlm serve exited with {proc.returncode}: {(tmp_path / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("vlm serve did not answer within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are needed (make test installs them: Debian's chromium, "
                        "chromium-driver)")
        pytest.skip("chromium / chromedriver not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    return condition()


def test_the_page_in_a_real_browser(files, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    expected_label = vlm.load(files["clip"]).classify(str(files["image"]), LABELS, top_k=1)[0][0][0]
    expected_caption = vlm.load(files["flamingo"]).caption(str(files["image"]))[0]
    browser.get(server)

    def upload(path):
        field = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        assert field, "no file input on the page"
        field[0].send_keys(str(path))

    def shown():
        caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")
        labels = browser.find_element(By.ID, "labels").text
        return (labels, caption) if caption and expected_label in labels else None

    upload(files["image"])
    labels, caption = _wait(shown) or (browser.find_element(By.ID, "labels").text, "")
    assert expected_label in labels and caption == expected_caption

    # a question about the uploaded image: typed, Ask clicked, the predictor's answer in the answer box
    expected_answer = vlm.load(files["flamingo"]).answer(str(files["image"]), QUESTION)[0]
    def answered():
        return browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")

    assert expected_answer and answered() == ""  # the upload alone leaves the box empty: Ask fills it
    browser.find_element(By.CSS_SELECTOR, "#question textarea, #question input").send_keys(QUESTION)
    browser.find_element(By.ID, "ask").click()
    assert _wait(answered) == expected_answer
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    upload(files["bad"])
    status = _wait(lambda: "not an image" in browser.find_element(By.ID, "status").text)
    assert status, browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "bad-upload.png"))

    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    upload(files["image"])  # the server is still alive and answers again
    assert _wait(lambda: browser.find_element(By.ID, "status").text == "Done.")

    browser.find_element(By.CSS_SELECTOR, "#query textarea, #query input").send_keys("a red circle")
    browser.find_element(By.ID, "search").click()
    assert _wait(lambda: "result(s)" in browser.find_element(By.ID, "search-status").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#matches img")) == 4
    browser.save_screenshot(str(tmp_path / "search.png"))


def test_rerank_hands_the_clip_to_the_captioner(files, monkeypatch, capsys):
    import vlm.serve

    served, captions = [], []

    class App:  # stands in for the Gradio app: captions the image while the page would be up, serves nothing
        def queue(self, **_):
            return self

        def launch(self, **_):
            captions.append(served[-1].describe(str(files["image"])))

    monkeypatch.setattr(vlm.serve, "build_app", lambda demo, examples: served.append(demo) or App())
    argv = ["serve", "--clip", str(files["clip"]), "--labels", "a,b", "--captioner", str(files["flamingo"])]
    assert main(argv + ["--rerank"]) == 0
    demo = served[-1]
    assert demo.captioner.reranker is demo.clip and demo.captioner.rerank_beams == 8
    expected = vlm.load(files["flamingo"]).rerank_with(vlm.load(files["clip"])).caption(files["image"])
    assert captions[-1] == expected[0]
    assert main(argv) == 0 and served[-1].captioner.reranker is None  # off unless asked
    assert main(["serve", "--captioner", str(files["flamingo"]), "--rerank"]) == 2
    assert "--rerank needs --clip" in capsys.readouterr().err
