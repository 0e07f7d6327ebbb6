"""scripts/answer.py end to end on a tiny Flamingo checkpoint: answers as ``vlm.load(ckpt).answer`` gives them,
metadata questions and their VQA accuracy, error lines, exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_checkpoints
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what colour is it?"


def _load_script():
    spec = importlib.util.spec_from_file_location("answer_script", ROOT / "scripts" / "answer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Flamingo checkpoint (gates open, so the image changes the answer; a 64-token context, room for an
    example) saved as vlm fit saves it, a CLIP checkpoint, and a folder of question records: two questions about
    0.png, one about 1.png, none about 2.png. One reference answer per held-out flag is the model's own answer, so
    the expected accuracies are neither 0 nor 1."""
    import vlm

    tmp = tmp_path_factory.mktemp("answer")
    ckpts = write_tiny_checkpoints(tmp, flamingo_context=64)
    ckpt, clip = ckpts["flamingo"], ckpts["clip"]
    folder = tmp / "images"
    folder.mkdir()
    for i, colour in enumerate(["yellow", "blue", "green"]):
        Image.new("RGB", (20, 24), colour).save(folder / f"{i}.png")
    model = vlm.load(ckpt)
    own = model.answer([folder / "0.png", folder / "1.png"], [QUESTION, QUESTION])
    assert all(own) and own[0] != own[1]  # (an untrained model may answer nothing, which would prove little)
    rows = [
        {"file_name": "0.png", "question": QUESTION, "answer": own[0], "heldout": False},  # right
        {"file_name": "0.png", "question": "how  many\tshapes?", "answers": ["zzz", "yyy"], "heldout": True},  # wrong
        {"file_name": "1.png", "question": QUESTION, "answers": [own[1]] * 4, "heldout": True},  # right
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "broken.png").write_bytes(b"not a png")
    return {"ckpt": ckpt, "clip": clip, "folder": folder, "tmp": tmp, "model": model}


def run(script, capsys, *argv):
    code = script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_answers_are_the_predictors_and_bad_inputs_get_error_lines(script, capsys, setup):
    good, other = setup["folder"] / "0.png", setup["folder"] / "1.png"
    code, out, err = run(script, capsys, "--checkpoint", setup["ckpt"], "--question", QUESTION, "--max-new-tokens", 3,
                         good, setup["tmp"] / "broken.png", setup["tmp"] / "missing.png", other)
    expected = setup["model"].answer([good, other], QUESTION, max_new_tokens=3)
    assert expected[0] != expected[1]  # the image matters: a script that mixed images up would fail
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 4
    assert lines[0] == f"{good}: {QUESTION} -> {expected[0]}" and lines[3] == f"{other}: {QUESTION} -> {expected[1]}"
    assert "broken.png: error:" in lines[1] and "missing.png: error: no such file" in lines[2]
    assert "2 of 4 inputs failed" in err and "Traceback" not in err


def test_metadata_questions_as_json_in_input_order(script, capsys, setup):
    folder, model = setup["folder"], setup["model"]
    code, out, err = run(script, capsys, "--checkpoint", setup["ckpt"], "--json", "--batch-size", 2, folder)
    records = [json.loads(line) for line in out.strip().splitlines()]
    asked = [("0.png", QUESTION), ("0.png", "how many shapes?"), ("1.png", QUESTION)]  # white space as training reads
    assert code == 1 and len(records) == 4
    for record, (name, question) in zip(records, asked):
        assert set(record) == {"path", "question", "answer"}
        assert record["path"] == str(folder / name) and record["question"] == question
        assert record["answer"] == model.answer(folder / name, question)[0]
    assert set(records[3]) == {"path", "error"} and records[3]["path"] == str(folder / "2.png")
    assert "no question" in records[3]["error"]
    # the scores follow on stderr with --json; 1 of the 2 held-out questions and the one seen are answered right
    scores = json.loads(err.strip().splitlines()[0])
    assert scores == {"questions": 3, "vqa_accuracy": round(2 / 3, 6), "vqa_accuracy_heldout": 0.5,
                      "vqa_accuracy_seen": 1.0}


def test_score_only_reports_vqa_accuracy(script, capsys, setup):
    from vlm.vqa import vqa_metrics

    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--score-only", setup["folder"] / "0.png",
                       setup["folder"] / "1.png")
    assert code == 0 and ".png" not in out
    model, folder = setup["model"], setup["folder"]
    preds = model.answer([folder / "0.png", folder / "0.png", folder / "1.png"],
                         [QUESTION, "how many shapes?", QUESTION])
    expected = vqa_metrics(preds, [[preds[0]], ["zzz", "yyy"], [preds[2]] * 4], [False, True, True])
    assert out.strip() == (f"VQA accuracy: {expected['vqa_accuracy']:.4f}  (3 questions)  "
                           f"held-out: {expected['vqa_accuracy_heldout']:.4f}  seen: 1.0000")


def test_few_shot_examples_reach_the_model(script, capsys, setup, monkeypatch):
    """The script's answer is the predictor's with the same example, and the example reaches the predictor as the
    same model input as the file (the tiny model's answer barely depends on the examples, so the spy checks them)."""
    from vlm.inference import CaptionPredictor

    model, folder = setup["model"], setup["folder"]
    example, query = folder / "1.png", folder / "0.png"
    seen, answer = [], CaptionPredictor.answer

    def spy(self, images, questions, examples=None, *args, **kwargs):
        seen.append(examples)
        return answer(self, images, questions, examples, *args, **kwargs)

    monkeypatch.setattr(CaptionPredictor, "answer", spy)
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--json", "--question", QUESTION,
                       "--example", example, QUESTION, "blue", query)
    monkeypatch.undo()
    expected = model.answer(query, QUESTION, examples=[(example, QUESTION, "blue")])[0]
    assert code == 0 and json.loads(out) == {"path": str(query), "question": QUESTION, "answer": expected}
    [(image, question, given)] = seen[0]
    assert (question, given) == (QUESTION, "blue") and torch.equal(model.preprocess(image), model.preprocess(example))


def test_a_metadata_question_too_long_gets_its_own_error_line(script, capsys, setup, tmp_path):
    for name in ("0.png", "1.png"):
        (tmp_path / name).write_bytes((setup["folder"] / name).read_bytes())
    rows = [{"file_name": "0.png", "question": "what colour? " * 40}, {"file_name": "1.png", "question": QUESTION}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(script, capsys, "--checkpoint", setup["ckpt"], "--json", tmp_path)
    first, second = (json.loads(line) for line in out.strip().splitlines())
    assert code == 1 and "context is 64 tokens" in first["error"] and first["question"].startswith("what colour?")
    assert second["answer"] == setup["model"].answer(tmp_path / "1.png", QUESTION)[0]
    assert "1 of 2 inputs failed" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "CLIP", "--question", QUESTION, "IMAGE"], "answering questions needs a Flamingo checkpoint"),
        (["--checkpoint", "CKPT", "IMAGE_ALONE"], "no questions"),
        (["--checkpoint", "CKPT", "--question", "what colour? " * 40, "IMAGE"], "context is 64 tokens"),
        (["--checkpoint", "CKPT", "--question", QUESTION, "--example", "IMAGE", QUESTION, "red " * 40, "IMAGE"],
         "context is 64 tokens"),
        (["--checkpoint", "NOPE", "--question", QUESTION, "IMAGE"], "not found"),
        (["--checkpoint", "CKPT", "--question", "  ", "IMAGE"], "--question is blank"),
        (["--checkpoint", "CKPT", "--question", QUESTION, "--max-new-tokens", "0", "IMAGE"], "--max-new-tokens"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(script, capsys, setup, argv, message):
    names = {"CLIP": setup["clip"], "CKPT": setup["ckpt"], "NOPE": setup["tmp"] / "nope.ckpt",
             "IMAGE": setup["folder"] / "0.png", "IMAGE_ALONE": setup["tmp"] / "broken.png"}
    argv = [str(names.get(a, a)) for a in argv]
    try:
        code = script.main(argv)
    except SystemExit as e:  # argument bounds are checked while parsing, as in caption.py
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_subprocess_exit_code_without_lightning(setup):
    """As a user runs it: JSON lines, exit 1 for the broken input, and neither Lightning nor torchmetrics imported
    (the checkpoint records its inference settings)."""
    code = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n    rc = 0\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "heavy = [m for m in ('lightning', 'torchmetrics', 'scipy') if m in sys.modules]\n"
        "print('heavy', heavy, file=sys.stderr)\n"
        "sys.exit(rc if not heavy else 3)\n"
    )
    args = [sys.executable, "-c", code, str(ROOT / "scripts" / "answer.py"), "--checkpoint", str(setup["ckpt"]),
            "--json", "--question", QUESTION, str(setup["folder"] / "2.png"), str(setup["tmp"] / "broken.png")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "heavy []" in proc.stderr and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert records[0]["answer"] == setup["model"].answer(setup["folder"] / "2.png", QUESTION)[0]
    assert set(records[1]) == {"path", "error"}
