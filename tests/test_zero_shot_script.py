"""scripts/zero_shot.py end to end on a tiny checkpoint: JSON contract, folders, accuracy, errors, exit codes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FP32_EPS, tiny_clip_config
from PIL import Image

from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.formats import CheckpointError, build_task, load_task

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
        # a float32 softmax over 3 labels sums to 1 within 4 ulps (2 roundings in the sum of the exps, a reciprocal
        # and a product for each value; one more for the sum taken here), and the JSON's rounding to 6 decimals moves
        # each of the 2 kept values by at most 5e-7
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 5 * FP32_EPS + 1e-6
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
    exact_model = copy.deepcopy(task.model).double()
    exact = classify(exact_model, image[None].double(),
                     build_classifier(exact_model, task.tokenizer, ["red", "blue"], task.templates))[0]
    got = {p["label"]: p["prob"] for p in json.loads(out)["predictions"]}
    # The script's float32 probabilities as close to the float64 ones as the library's (the rule of
    # conftest.assert_fp32_close), plus the JSON's rounding to 6 decimals (at most 5e-7).
    bound = 5e-7 + max(4 * (probs[0].double() - exact).abs().max().item(), 8 * FP32_EPS * exact.abs().max().item())
    assert abs(got["red"] - exact[0].item()) <= bound and abs(got["blue"] - exact[1].item()) <= bound, (got, exact)


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
    assert code == 2 and "refused config.class_path: 'builtins.dict' is not one of vlm's buildable task classes" in err
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


# ------------------------------------------------------------------------------ loading without Lightning
def _classify(loaded, folder) -> torch.Tensor:
    from vlm.data.images import load_image
    from vlm.data.transforms import eval_transform
    from vlm.zero_shot import build_classifier, classify

    transform = eval_transform(loaded.image_size, loaded.image_mean, loaded.image_std)
    images = torch.stack([transform(load_image(folder / f"{i:02d}.png")) for i in range(3)])
    classes = build_classifier(loaded.model, loaded.tokenizer, ["red", "blue", "green"], loaded.templates)
    return classify(loaded.model, images, classes)


def test_checkpoint_records_the_inference_settings_and_loads_them_without_the_task(checkpoint, folder):
    from vlm.formats import load_zero_shot

    settings = torch.load(checkpoint, weights_only=True)["inference"]
    tokenizer = {"class_path": "vlm.data.tokenizer.CLIPTokenizer", "init_args": {"context_length": 16}}
    assert settings == {"tokenizer": tokenizer, "templates": ["a {}"], "image_mean": list(OPENAI_CLIP_MEAN),
                        "image_std": list(OPENAI_CLIP_STD), "template_pooling": "mean"}  # fmt: skip
    fast, task = load_zero_shot(checkpoint), load_task(checkpoint)
    assert not fast.model.training and fast.image_size == task.image_size == 16
    assert fast.tokenizer.context_length == 16 and fast.templates == task.templates
    assert torch.equal(_classify(fast, folder), _classify(task, folder))


def test_without_inference_settings_the_full_task_loads_it(checkpoint, folder, tmp_path):
    from vlm.formats import load_zero_shot

    old = tmp_path / "old.ckpt"  # as written before checkpoints carried the settings
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["inference"]
    torch.save(ckpt, old)
    assert torch.equal(_classify(load_zero_shot(old), folder), _classify(load_zero_shot(checkpoint), folder))


@pytest.mark.parametrize("tokenizer, message", [
    ({"class_path": "os.system", "init_args": {"command": "true"}},
     "refused inference.tokenizer.class_path: 'os.system' is not one of vlm's buildable tokenizer classes"),
    ({"class_path": "vlm.data.tokenizer.CLIPTokenizer", "init_args": {"nope": 1}},
     "refused inference.tokenizer.init_args.nope: vlm.data.tokenizer.CLIPTokenizer has no argument 'nope'"),
    (None, "inference settings are incomplete"),  # a setting deleted by hand
])  # fmt: skip
def test_bad_inference_settings_are_checkpoint_errors(checkpoint, folder, tmp_path, capsys, tokenizer, message):
    crafted = tmp_path / "crafted.ckpt"
    ckpt = torch.load(checkpoint, weights_only=True)
    if tokenizer is None:
        del ckpt["inference"]["templates"]
    else:
        ckpt["inference"]["tokenizer"] = tokenizer
    torch.save(ckpt, crafted)
    code, _, err = run(capsys, "--checkpoint", str(crafted), "--labels", "a,b", str(folder))
    assert code == 2 and message in err


def test_script_classifies_without_importing_lightning(checkpoint, folder):
    # Lightning (and the torchmetrics, transformers and SciPy it imports) took most of a short run's time.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import zero_shot; "
        "rc = zero_shot.main(['--checkpoint', sys.argv[2], '--labels', 'red,blue,green', '--json', sys.argv[3]]); "
        "heavy = [m for m in ('lightning', 'torchmetrics', 'scipy') if m in sys.modules]; "
        "print('heavy', heavy, file=sys.stderr); sys.exit(rc or bool(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts"), str(checkpoint), str(folder)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "heavy []" in proc.stderr and len(proc.stdout.splitlines()) == 3


def test_an_export_loads_without_the_task_and_classifies_alike(checkpoint, folder, tmp_path):
    from vlm.cli import export_main
    from vlm.formats import load_zero_shot

    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "inference" in json.loads((out / "config.json").read_text())
    assert torch.equal(_classify(load_zero_shot(out), folder), _classify(load_task(checkpoint), folder))
    # an export without the settings (written before they existed) still loads, through the task
    config = json.loads((out / "config.json").read_text())
    del config["inference"]
    (out / "config.json").write_text(json.dumps(config))
    assert torch.equal(_classify(load_zero_shot(out), folder), _classify(load_task(checkpoint), folder))
