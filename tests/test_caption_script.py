"""scripts/caption.py end to end on a tiny Flamingo checkpoint: outputs, error lines, exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_FLAMINGO
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_FLAMINGO


def _load_script():
    spec = importlib.util.spec_from_file_location("caption_script", ROOT / "scripts" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vlm.formats import build_task

    tmp = tmp_path_factory.mktemp("caption")
    torch.manual_seed(0)
    task = build_task(TINY)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, tmp / "flamingo.ckpt")
    lm = build_task({"class_path": "vlm.tasks.language.LanguageModelTask",
                     "init_args": {"model": TINY["init_args"]["model"]["init_args"]["decoder"]}})
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}, tmp / "lm.ckpt")
    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(["a small red circle", "a large blue star", "a small green cross"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": caption, "label": caption[8:], "heldout": i == 1})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "broken.png").write_bytes(b"not a png")
    (tmp / "empty").mkdir()
    return {"ckpt": str(tmp / "flamingo.ckpt"), "lm": str(tmp / "lm.ckpt"), "folder": folder, "tmp": tmp}


@pytest.fixture(scope="module")
def script():
    return _load_script()


def run(script, capsys, *argv):
    code = script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_captions_and_error_lines(script, capsys, setup):
    good = setup["folder"] / "0.png"
    code, out, err = run(script, capsys, "--checkpoint", setup["ckpt"], good, setup["tmp"] / "broken.png",
                         setup["tmp"] / "missing.png", setup["folder"] / "1.png")
    lines = out.strip().splitlines()[:4]  # then the scores: these images have reference captions
    assert code == 1 and len(lines) == 4
    assert lines[0].startswith(f"{good}: ") and "error" not in lines[0]
    assert "broken.png: error:" in lines[1] and "missing.png: error:" in lines[2]
    assert "2 of 4 inputs failed" in err and "Traceback" not in err


def test_json_lines_in_input_order(script, capsys, setup):
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--json", "--num-beams", "2",
                       setup["folder"], setup["tmp"] / "broken.png")
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 1
    assert [Path(r["path"]).name for r in records] == ["0.png", "1.png", "2.png", "broken.png"]
    assert all(isinstance(r["caption"], str) for r in records[:3]) and "error" in records[3]


def test_all_good_inputs_exit_zero_and_folder_scores(script, capsys, setup):
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--batch-size", "2", setup["folder"])
    assert code == 0
    assert len([line for line in out.splitlines() if line.endswith("png") or ".png: " in line]) == 3
    assert "BLEU-4:" in out and "attribute accuracy" in out and "held-out:" in out


def test_score_only(script, capsys, setup):
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--score-only", setup["folder"])
    assert code == 0 and ".png" not in out and "BLEU-4:" in out and "CIDEr:" in out
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--score-only", "--json", setup["folder"])
    scores = json.loads(out)
    assert scores["images"] == 3 and {"bleu4", "cider", "attribute_accuracy"} <= set(scores)


def test_few_shot_examples(script, capsys, setup):
    """The examples reach the model: the script's caption equals the captioner's on the stacked (example, input)
    images under the few-shot prompt, which differs from the caption without them."""
    from vlm.generation import few_shot_prompt
    from vlm.inference import load

    example, query = setup["folder"] / "0.png", setup["folder"] / "1.png"
    code, out, _ = run(script, capsys, "--checkpoint", setup["ckpt"], "--json", "--example", example,
                       "a small red circle", query)
    assert code == 0
    model = load(setup["ckpt"])
    images = model.preprocess([example, query]).unsqueeze(0)  # (1, 2, 3, H, W): the example, then the input
    prompt = few_shot_prompt(["a small red circle"], model.captioner.tokenizer.prompt)
    expected = model.captioner.generate_captions(images, prompt)[0]
    without = model.captioner.generate_captions(images[:, 1])[0]
    assert expected != without  # otherwise this test could not tell the examples were used
    assert json.loads(out)["caption"] == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "<image><image>"], "2 <image> marker(s) but there are 1 image"),
        (["--example", "EXAMPLE", "a red circle", "--prompt", "<image>"], "1 <image> marker(s) but there are 2"),
        (["--prompt", "a red circle " * 20], "context"),
    ],
)
def test_bad_prompts_are_usage_errors(script, capsys, setup, extra, message):
    extra = [str(setup["folder"] / "0.png") if a == "EXAMPLE" else a for a in extra]
    code, out, err = run(script, capsys, "--checkpoint", setup["ckpt"], *extra, setup["folder"] / "1.png")
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_checkpoint_and_path_errors(script, capsys, setup):
    code, _, err = run(script, capsys, "--checkpoint", setup["tmp"] / "nope.ckpt", setup["folder"])
    assert code == 2 and "not found" in err
    code, _, err = run(script, capsys, "--checkpoint", setup["lm"], setup["folder"])
    assert code == 2 and "LanguageModelTask" in err and "FlamingoTask" in err
    code, _, err = run(script, capsys, "--checkpoint", setup["ckpt"], setup["tmp"] / "empty")
    assert code == 2 and "no images" in err
    with pytest.raises(SystemExit) as e:
        script.main(["--checkpoint", setup["ckpt"]])  # no PATH: argparse's usage error
    assert e.value.code == 2


def test_subprocess_end_to_end(setup):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "caption.py"), "--checkpoint", setup["ckpt"], "--json",
         str(setup["folder"] / "2.png"), str(setup["tmp"] / "broken.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert "caption" in records[0] and "error" in records[1]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ loading without Lightning
@pytest.fixture(scope="module")
def with_settings(tmp_path_factory):
    """A checkpoint as vlm fit writes it (with the inference settings) and an export of it, of a task whose
    gates are open (the images matter) and whose decoding is restricted to a vocabulary."""
    import copy

    from vlm.formats import build_task
    from vlm.formats.export import export_task

    tmp = tmp_path_factory.mktemp("caption-fast")
    config = copy.deepcopy(TINY)
    config["init_args"].update(vocabulary=["a", "small", "large", "red", "blue", "circle", "star"], num_beams=2)
    torch.manual_seed(0)
    task = build_task(config)
    with torch.no_grad():
        for blk in task.model.cross_attn:
            blk.attn_gate.fill_(1.0)
            blk.mlp_gate.fill_(1.0)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "fast.ckpt")
    return task.eval(), tmp / "fast.ckpt", export_task(task, tmp / "exported")


def test_checkpoint_and_export_caption_alike_without_the_task(with_settings):
    from vlm.formats import load_captioner

    task, ckpt, exported = with_settings
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = task.generate_captions(images)
    assert torch.load(ckpt, weights_only=True)["inference"]["vocab_ids"] == task.vocab_ids.tolist()
    for path in (ckpt, exported):
        loaded = load_captioner(path)
        assert not loaded.model.training and loaded.num_beams == 2 and loaded.max_new_tokens == 5
        assert loaded.vocab_ids == task.vocab_ids.tolist() and set(loaded.attribute_words) == task.attribute_words
        assert loaded.tokenizer.encode_prompts(["<image>a"])["input_ids"].tolist() == \
            task.tokenizer.encode_prompts(["<image>a"])["input_ids"].tolist()
        assert loaded.generate_captions(images) == expected


def test_caption_script_runs_without_importing_lightning(with_settings, setup):
    _, ckpt, _ = with_settings
    code = (
        "import runpy, sys\n"
        "script, ckpt, folder = sys.argv[1:4]\n"
        "sys.argv = [script, '--checkpoint', ckpt, '--json', folder]\n"
        "try:\n    runpy.run_path(script, run_name='__main__')\n    rc = 0\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "heavy = [m for m in ('lightning', 'torchmetrics', 'scipy') if m in sys.modules]\n"
        "print('heavy', heavy, file=sys.stderr)\n"
        "sys.exit(rc or bool(heavy))\n"
    )
    args = [sys.executable, "-c", code, str(ROOT / "scripts" / "caption.py"), str(ckpt), str(setup["folder"])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "heavy []" in proc.stderr
    assert [json.loads(line)["path"].endswith(".png") for line in proc.stdout.splitlines()] == [True] * 3
