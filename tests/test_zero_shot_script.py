"""scripts/zero_shot.py end to end on a tiny checkpoint: JSON contract, folders, accuracy, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image

from vlm.checkpoint import CheckpointError, build_task, load_task

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import zero_shot  # noqa: E402


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.randn(3, 16, 16), "text": torch.randint(1, 400, (16,))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    task = build_task(tiny_clip_config())
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(task, torch.utils.data.DataLoader(_Pairs(), batch_size=4))
    trainer.save_checkpoint(out / "tiny.ckpt")
    return out / "tiny.ckpt"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    rows = []
    for i, (colour, label) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green")]):
        Image.new("RGB", (20, 20), colour).save(d / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "caption": f"a {label} square", "label": label})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "notes.txt").write_text("not an image, and not listed: folders yield only image files")
    return d


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = zero_shot.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_lines_for_a_folder_in_sorted_order(checkpoint, folder, capsys):
    code, out, err = run(
        capsys, "--checkpoint", str(checkpoint), "--labels", "red,blue,green", "--json", "--top-k", "2", str(folder)
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["00.png", "01.png", "02.png"]
    for r in lines:
        probs = [p["prob"] for p in r["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {p["label"] for p in r["predictions"]} <= {"red", "blue", "green"}
    assert "accuracy" in err  # the labelled folder's accuracy goes to stderr in JSON mode


def test_predictions_match_the_library(checkpoint, folder, capsys):
    from vlm.data.images import load_image
    from vlm.data.transforms import eval_transform
    from vlm.zero_shot import build_classifier, classify

    code, out, _ = run(
        capsys, "--checkpoint", str(checkpoint), "--labels", "red,blue", "--json", str(folder / "00.png")
    )
    task = load_task(checkpoint)
    image = eval_transform(task.image_size, task.image_mean, task.image_std)(load_image(folder / "00.png"))
    probs = classify(
        task.model, image[None], build_classifier(task.model, task.tokenizer, ["red", "blue"], task.templates)
    )
    got = {p["label"]: p["prob"] for p in json.loads(out)["predictions"]}
    assert got["red"] == pytest.approx(probs[0, 0].item(), abs=1e-5)
    assert got["blue"] == pytest.approx(probs[0, 1].item(), abs=1e-5)


def test_bad_inputs_get_one_error_line_and_the_rest_are_processed(checkpoint, folder, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    code, out, _ = run(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--labels",
        "red,blue",
        "--json",
        str(empty),
        str(folder / "01.png"),
        str(tmp_path / "missing.jpg"),
    )
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    assert "error" in lines[0] and "predictions" in lines[1] and "error" in lines[2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", " , "], "no labels"),
        (["--labels", "a,,b"], "blank"),
        (["--labels", "a,a"], "duplicate"),
        (["--labels", "a", "--top-k", "0"], "top-k"),
    ],
)
def test_usage_errors_exit_2(checkpoint, folder, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        zero_shot.main(["--checkpoint", str(checkpoint), *args, str(folder)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_and_foreign_checkpoints_exit_2(folder, tmp_path, capsys):
    code, _, err = run(capsys, "--checkpoint", str(tmp_path / "nope.ckpt"), "--labels", "a,b", str(folder))
    assert code == 2 and "checkpoint not found" in err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "builtins.dict"}}, foreign)
    code, _, err = run(capsys, "--checkpoint", str(foreign), "--labels", "a,b", str(folder))
    assert code == 2 and "only tasks from the vlm package" in err
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint")
        load_task(tmp_path / "junk.ckpt")


def test_subprocess_has_no_traceback_for_user_errors(checkpoint, tmp_path):
    (tmp_path / "bad.png").write_text("text renamed .png")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "zero_shot.py"),
            "--checkpoint",
            str(checkpoint),
            "--labels",
            "a,b",
            str(tmp_path / "bad.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "error" in proc.stdout
