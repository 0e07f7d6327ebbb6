"""Visual question answering (issue 30): the VQAv2 accuracy against hand-worked cases of its rules, question records
trained on their answers only, the built-in shapes questions, their configs, and a real `vlm fit` in VQA mode."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_FLAMINGO
from PIL import Image

from vlm.data.datamodules import ImageTextDataModule
from vlm.data.gpt2_tokenizer import IGNORE_INDEX, FlamingoTokenizer
from vlm.data.vqa import parse_answers, training_answer
from vlm.vqa import first_answer, normalize_answer, vqa_accuracy, vqa_metrics, vqa_score

ROOT = Path(__file__).parent.parent


# ----------------------------------------------------------------------------------------------- the metric
@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"),  # number words become digits, after lower-casing
    ("none", "0"),
    ("a dog", "dog"),  # articles go
    ("The  Cat ", "cat"),
    ("yes.", "yes"),  # a period not followed by a digit goes...
    ("3.5", "3.5"),  # ...one before a digit stays
    ("Yes!", "yes"),  # punctuation away from spaces becomes a space, then spaces collapse
    ("red/blue", "red blue"),
    ("yes, it is", "yes it is"),  # punctuation next to a space is removed
    ("1,000", "1000"),  # a digit-comma-digit number: all punctuation is removed
    ("dont", "don't"),  # contractions get their apostrophe
    ("its", "its"),  # but not a bare spelling that is another word
    ("two dogs\tand\na cat", "2 dogs and cat"),
])
def test_normalisation_follows_the_vqav2_rules(raw, normal):
    assert normalize_answer(raw) == normal


def test_one_reference_answer_is_exact_match_after_normalisation():
    assert vqa_score("Two", ["2"]) == 1.0
    assert vqa_score("a dog", ["dog"]) == 1.0
    assert vqa_score("yes.", ["yes"]) == 1.0
    assert vqa_score("yes.", "yes") == 1.0  # a plain string is one answer
    assert vqa_score("dog", ["cat"]) == 0.0
    assert vqa_score("two dogs", ["2"]) == 0.0  # normalised, not a substring test
    with pytest.raises(ValueError):
        vqa_score("dog", [])


@pytest.mark.parametrize("matching, expected", [
    # Ten humans, `matching` of them gave the answer. Leave each human out in turn (10 subsets of 9); with a matching
    # human left out the others hold matching - 1 matches, else matching; each subset scores min(count / 3, 1).
    (0, 0.0),
    (1, (1 * 0 / 3 + 9 * 1 / 3) / 10),  # 0.3
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6 (the plain min(2/3, 1) would say 0.667)
    (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    (4, (4 * 1 + 6 * 1) / 10),  # 1.0
    (10, 1.0),
])
def test_ten_human_answers_give_the_averaged_soft_score(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_score("2", answers) == pytest.approx(expected, abs=1e-12)
    assert {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}[matching] == pytest.approx(expected, abs=1e-12)


def test_human_answers_match_after_normalisation():
    answers = ["Two", "2.", "two"] + ["three"] * 7  # three humans said 2, written three ways
    assert vqa_score("2", answers) == pytest.approx(0.9)
    assert vqa_score("the two", answers) == pytest.approx(0.9)


def test_accuracy_is_the_mean_and_held_out_questions_are_scored_apart():
    preds, answers = ["red", "2", "left"], [["red"], ["two"], ["right"]]
    assert vqa_accuracy(preds, answers) == pytest.approx(2 / 3)
    assert vqa_metrics(preds, answers) == {"vqa_accuracy": pytest.approx(2 / 3)}
    assert vqa_metrics(preds, answers, [None, None, None]) == {"vqa_accuracy": pytest.approx(2 / 3)}
    metrics = vqa_metrics(preds, answers, [True, False, True])
    assert metrics == {"vqa_accuracy": pytest.approx(2 / 3), "vqa_accuracy_heldout": pytest.approx(0.5),
                       "vqa_accuracy_seen": pytest.approx(1.0)}
    with pytest.raises(ValueError):
        vqa_accuracy(["red"], [])


def test_first_answer_stops_where_a_next_turn_starts():
    assert first_answer(" red Question: what shape") == "red"
    assert first_answer("2 Answer: 3") == "2"
    assert first_answer(" large ") == "large"


# --------------------------------------------------------------------------------------- answer-only masking
def _tokenizer() -> FlamingoTokenizer:
    return FlamingoTokenizer(context_length=48, vocab_offset=50257)


def test_question_tokens_are_masked_and_the_answer_end_of_chunk_and_eos_are_learned():
    tok = _tokenizer()
    assert tok.question_prompt == "<image>Question: {question} Short answer:"
    assert tok.question_text("what colour is the star?") == "<image>Question: what colour is the star? Short answer:"
    batch = tok.encode_questions(["what colour is the star?", "how many shapes are there?"], ["red", "two"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt = tok.encode("<image>Question: what colour is the star? Short answer:")
    answer = tok.encode(" red")
    expected = [tok.bos_token_id, *prompt, *answer, tok.end_of_chunk_token_id, tok.eos_token_id]
    n = len(expected)
    assert ids[0, :n].tolist() == expected and int(mask[0].sum()) == n
    assert prompt[0] == tok.image_token_id  # the prompt places the image
    # ignored: bos and every prompt token (the question); learned: the answer, <|endofchunk|>, eos; padding ignored
    ignored = 1 + len(prompt)
    assert (labels[0, :ignored] == IGNORE_INDEX).all()
    assert labels[0, ignored:n].tolist() == [*answer, tok.end_of_chunk_token_id, tok.eos_token_id]
    assert (labels[0, n:] == IGNORE_INDEX).all()
    learned = (labels != IGNORE_INDEX).sum(1).tolist()
    assert learned == [len(answer) + 2, len(tok.encode(" two")) + 2]
    # generation asks exactly the training prompt: the answer continues it token for token
    generation = tok.encode_prompts([tok.question_text("what colour is the star?")])["input_ids"][0].tolist()
    assert generation == expected[: 1 + len(prompt)]


def test_question_prompts_are_checked_and_a_question_never_adds_an_image():
    for bad in ("Question: {question}", "<image><image>{question}", "<image>{question} {answer}", "<image>Q:"):
        with pytest.raises(ValueError, match="question_prompt"):
            FlamingoTokenizer(question_prompt=bad)
    tok = FlamingoTokenizer(context_length=48, question_prompt="Q: {question} <image> A: ")
    assert tok.question_text("a <image> b?") == "Q: a b? <image> A:"  # one space before the answer, added later
    too_long = FlamingoTokenizer(context_length=12)
    with pytest.raises(ValueError, match="context length is 12"):
        too_long.encode_questions(["what colour is the large star left of the circle?"], ["red"])


def test_the_answer_to_train_on_is_the_most_frequent_one():
    assert training_answer(["blue", "red", "Red ", "red"]) == "red"  # case and spaces do not split votes
    assert training_answer(["blue", "red"]) == "blue"  # a tie: the first listed
    assert training_answer([]) == ""
    assert parse_answers('["2", "two", ""]') == ["2", "two"]  # a CSV cell holding a JSON list
    assert parse_answers("two") == ["two"]
    assert parse_answers(None) == []


def _question_folder(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True)
    for i in range(len(rows)):
        Image.new("RGB", (20, 20), (40 * i % 255, 0, 0)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", **r}) + "\n"
                                                 for i, r in enumerate(rows)))
    return root


@pytest.mark.parametrize("in_memory", [False, True])
def test_question_records_batch_with_answer_only_labels(tmp_path, in_memory):
    """``answer`` rows train on their answer; ``answers`` rows (several humans) train on the most frequent one and
    are scored against all of them."""
    rows = [{"question": "what colour is the star?", "answer": "red", "heldout": False},
            {"question": "how many shapes are there?", "answers": ["2", "two", "2", "3"], "heldout": True},
            {"question": "what shape is it?", "answers": ["Circle", "square", "circle"], "heldout": False}]
    root = _question_folder(tmp_path / "val", rows)
    tok = _tokenizer()
    dm = ImageTextDataModule(val=str(root), tokenizer=tok, image_size=16, batch_size=3, in_memory=in_memory)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["question"] == [r["question"] for r in rows]
    assert batch["caption"] == ["red", "2", "Circle"]  # what the model trains on
    assert batch["answers"] == [["red"], ["2", "two", "2", "3"], ["Circle", "square", "circle"]]
    assert batch["heldout"] == [False, True, False]
    expected = tok.encode_questions(batch["question"], ["red", "2", "Circle"])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    for i, answer in enumerate(["red", "2", "Circle"]):
        learned = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert learned == [*tok.encode(" " + answer), tok.end_of_chunk_token_id, tok.eos_token_id]


def test_csv_question_records_and_captions_unchanged_without_questions(tmp_path):
    tok = _tokenizer()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "a.png")
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["image", "question", "answers"], ["imgs/a.png", "what is it?", '["dog", "a dog", "cat"]']])
    dm = ImageTextDataModule(val=str(tmp_path / "qa.csv"), tokenizer=tok, image_size=16, batch_size=1)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["answers"] == [["dog", "a dog", "cat"]] and batch["caption"] == ["dog"]
    # a captioned folder: no question entries, the caption layout of before
    (tmp_path / "cap").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "cap" / "0.png")
    (tmp_path / "cap" / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "a red star"}))
    dm = ImageTextDataModule(val=str(tmp_path / "cap"), tokenizer=tok, image_size=16, batch_size=1)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert "question" not in batch and "answers" not in batch
    assert torch.equal(batch["labels"], tok.encode_batch(["a red star"])["labels"])


def test_question_records_need_an_answer_and_a_question_writing_tokenizer(tmp_path):
    from vlm.data.tokenizer import CLIPTokenizer

    root = _question_folder(tmp_path / "q", [{"question": "what colour?", "answer": "red"}])
    dm = ImageTextDataModule(val=str(root), tokenizer=CLIPTokenizer(context_length=16), image_size=16, batch_size=1)
    dm.setup("validate")
    with pytest.raises(ValueError, match="question prompts"):
        next(iter(dm.val_dataloader()))
    bad = _question_folder(tmp_path / "bad", [{"question": "what colour?", "reply": "red"}])
    with pytest.raises(ValueError, match="'answer' or 'answers'"):
        ImageTextDataModule(val=str(bad), tokenizer=_tokenizer(), image_size=16).setup("validate")


# ------------------------------------------------------------------------------------ built-in shapes questions
def _read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_shapes_vqa_is_deterministic_for_a_seed(tmp_path):
    from vlm.data.shapes_vqa import generate_shapes_vqa

    a = generate_shapes_vqa(tmp_path / "a", train=12, val=8, seed=3)
    b = generate_shapes_vqa(tmp_path / "b", train=12, val=8, seed=3)
    c = generate_shapes_vqa(tmp_path / "c", train=12, val=8, seed=4)
    for split in ("train", "validation"):
        assert (a / split / "metadata.jsonl").read_bytes() == (b / split / "metadata.jsonl").read_bytes()
        for png in sorted((a / split).glob("*.png")):
            assert png.read_bytes() == (b / split / png.name).read_bytes()
    assert (a / "train" / "metadata.jsonl").read_bytes() != (c / "train" / "metadata.jsonl").read_bytes()
    assert (a / "train" / "00000.png").read_bytes() != (c / "train" / "00000.png").read_bytes()


def test_shapes_vqa_holds_out_pairs_and_asks_every_kind(tmp_path):
    from vlm.data import shapes
    from vlm.data.shapes_vqa import KINDS, _scene, generate_shapes_vqa

    out = generate_shapes_vqa(tmp_path / "vqa", train=300, val=72, seed=0, questions_per_image=3)
    train, val = _read_rows(out / "train"), _read_rows(out / "validation")
    heldout_names = [f"{c} {s}" for c, s in shapes.HELD_OUT]
    # no held-out pair in a training image, question or answer
    for i in range(300):
        scene, _ = _scene("train", 0, i, 64)
        assert all((o.colour, o.shape) not in shapes.HELD_OUT for o in scene.objects)
    assert not any(r["heldout"] for r in train)
    assert not any(name in r["question"] for r in train for name in heldout_names)
    # validation starts each image with the 36 classes in turn: held-out images get the flag and questions
    flagged = {r["file_name"] for r in val if r["heldout"]}
    assert {f"{i:05d}.png" for i in range(72) if shapes.CLASSNAMES[i % 36] in heldout_names} <= flagged
    assert any(name in r["question"] for r in val for name in heldout_names)
    # every kind is asked, each image gets distinct kinds, answers come from each kind's set
    answers = {"colour": set(shapes.COLOURS), "shape": set(shapes.SHAPES), "size": set(shapes.SIZES),
               "count": {"0", "1", "2"}, "position": {"left", "right", "above", "below", "top", "bottom"}}
    for rows in (train, val):
        assert {r["kind"] for r in rows} == set(KINDS)
        for r in rows:
            assert r["answer"] in answers[r["kind"]], r
        per_image: dict[str, list[str]] = {}
        for r in rows:
            per_image.setdefault(r["file_name"], []).append(r["kind"])
        assert all(len(k) == len(set(k)) and 1 <= len(k) <= 3 for k in per_image.values())
    assert len(train) > 2.5 * 300  # nearly every image has three unambiguous questions


def test_shapes_vqa_answers_match_the_scene(tmp_path):
    """Re-derive each training answer from the scene the image was drawn from."""
    from vlm.data.shapes_vqa import _scene, make_questions

    for i in range(60):
        scene, _ = _scene("train", 0, i, 64)
        _, rows = make_questions("train", 0, i, 64, questions_per_image=5)
        objects = scene.objects
        for r in rows:
            q, a = r["question"], r["answer"]
            if r["kind"] == "count" and q == "how many shapes are there?":
                assert a == str(len(objects))
            elif r["kind"] == "count":
                colour = q.split()[2]
                assert a == str(sum(o.colour == colour for o in objects))
            elif r["kind"] == "colour":
                assert any(o.colour == a and o.shape in q for o in objects)
            elif r["kind"] == "position" and len(objects) == 2:
                named = [o for o in objects if f"{o.colour} {o.shape}" in q.split(" relative to ")[0]]
                other = [o for o in objects if o is not named[0]][0]
                dx, dy = named[0].cx - other.cx, named[0].cy - other.cy
                horizontal = abs(dx) >= abs(dy)
                assert a == (("left" if dx < 0 else "right") if horizontal else ("above" if dy < 0 else "below"))


def test_vlm_data_shapes_vqa_writes_the_folder(tmp_path, capsys):
    from vlm.__main__ import main

    assert main(["data", "shapes-vqa", "--out", str(tmp_path / "q"), "--train", "4", "--val", "2",
                 "--questions-per-image", "2"]) == 0
    assert "wrote 4 train + 2 validation" in capsys.readouterr().out
    assert len(_read_rows(tmp_path / "q" / "validation")) <= 4
    assert (tmp_path / "q" / "heldout.txt").read_text().splitlines()[0] == "red triangle"
    with pytest.raises(SystemExit) as usage:  # argparse's usage error
        main(["data", "shapes-vqa", "--out", str(tmp_path / "r"), "--questions-per-image", "0"])
    assert usage.value.code == 2
    assert main(["data", "shapes-vqa", "--out", str(tmp_path / "r"), "--questions-per-image", "6"]) == 1
    assert "questions_per_image must be 1 to 5" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- configs
def test_shapes_vqa_config_continues_the_shapes_captioner_and_spells_every_answer():
    from vlm.data.shapes_vqa import make_questions
    from vlm.formats import build_task

    vqa = yaml.safe_load((ROOT / "configs/flamingo/shapes_vqa.yaml").read_text())
    shapes_cfg = yaml.safe_load((ROOT / "configs/flamingo/shapes.yaml").read_text())
    args, base = vqa["model"]["init_args"], shapes_cfg["model"]["init_args"]
    for key in ("model", "tokenizer"):  # the captioner's architecture, so its weights load whole
        assert args[key] == base[key], key
    assert args["init_weights"] == f"{shapes_cfg['trainer']['default_root_dir']}/checkpoints/last.ckpt"
    assert vqa["trainer"]["default_root_dir"] != shapes_cfg["trainer"]["default_root_dir"]
    assert set(base["vocabulary"]) <= set(args["vocabulary"])
    task = build_task(vqa["model"])
    assert task.tokenizer.question_prompt == "<image>Question: {question} Short answer:"
    allowed = set(task.vocab_ids.tolist())
    for i in range(40):
        for row in make_questions("validation", 0, i, 64, questions_per_image=5)[1]:
            enc = task.tokenizer.encode_questions([row["question"]], [row["answer"]])
            learned = enc["labels"][enc["labels"] != IGNORE_INDEX].tolist()
            assert set(learned) <= allowed, row
    imagefolder = yaml.safe_load((ROOT / "configs/flamingo/vqa_imagefolder.yaml").read_text())
    own = yaml.safe_load((ROOT / "configs/flamingo/imagefolder.yaml").read_text())
    assert imagefolder["model"]["init_args"]["model"] == own["model"]["init_args"]["model"]
    assert imagefolder["model"]["init_args"]["decoder_weights"] == own["model"]["init_args"]["decoder_weights"]


# ------------------------------------------------------------------------------------------------ training
def _tiny_vqa_task() -> dict:
    cfg = copy.deepcopy(TINY_FLAMINGO)
    cfg["init_args"]["model"]["init_args"]["decoder"]["init_args"]["context_length"] = 40
    cfg["init_args"]["max_new_tokens"] = 3
    cfg["init_args"]["attribute_words"] = []
    return cfg


def test_vlm_fit_trains_on_question_records_and_logs_vqa_accuracy(tmp_path):
    from vlm.__main__ import main

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 3, "log_every_n_steps": 1,
                    "check_val_every_n_epoch": None, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "run")}},
                    "callbacks": [{"class_path": "vlm.callbacks.Checkpoint",
                                   "init_args": {"every_n_train_steps": 3, "save_top_k": 0}}]},
        "model": _tiny_vqa_task(),
        "data": {"class_path": "vlm.data.datamodules.ImageTextDataModule", "init_args": {
            "source": {"class_path": "vlm.data.builtin.ShapesVQASource",
                       "init_args": {"data_dir": str(tmp_path / "data"), "num_train": 8, "num_val": 6,
                                     "questions_per_image": 2}},
            "batch_size": 4, "val_batch_size": 16, "in_memory": True}},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    assert (tmp_path / "data" / "train" / "metadata.jsonl").is_file()  # the source wrote its folder
    (metrics_file,) = (tmp_path / "run").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "val/loss", "val/vqa_accuracy", "val/vqa_accuracy_heldout", "val/vqa_accuracy_seen"} <= logged
    assert not any(k.startswith(("val/bleu", "val/cider", "val/attribute")) for k in logged)
    accuracy = [float(r["val/vqa_accuracy"]) for r in rows if r.get("val/vqa_accuracy")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    # the checkpoint keeps how questions are asked, for answering later
    assert ckpt["inference"]["tokenizer"]["init_args"]["question_prompt"] == "<image>Question: {question} Short answer:"


def test_validation_answers_each_question_with_its_own_prompt():
    from conftest import build_trainable

    task = build_trainable(_tiny_vqa_task())
    task.eval()
    tok = task.tokenizer
    images = torch.randn(2, 3, 16, 16)
    questions = ["what colour is the star?", "how many shapes are there?"]
    batch = {"image": images, "question": questions, "answers": [["red"], ["2", "two"]], "heldout": [True, False],
             "caption": ["red", "2"], "label": ["", ""], **tok.encode_questions(questions, ["red", "2"])}
    task.on_validation_epoch_start()
    task.validation_step(batch, 0)
    # the same answers as asking each question alone, with its prompt
    captioner = task.captioner()
    alone = [captioner.generate_captions(images[i: i + 1], tok.question_text(q))[0] for i, q in enumerate(questions)]
    assert task._val["pred"] == [first_answer(a) for a in alone]
    assert task._val["answers"] == [["red"], ["2", "two"]] and task._val["heldout"] == [True, False]


# ------------------------------------------------------------------------------------------ answering from Python
def test_few_shot_question_text_asks_each_example_in_the_training_layout():
    tok = _tokenizer()
    text = tok.few_shot_question_text("what shape?", [("what colour?", "red"), ("how many?", " 2 <|endofchunk|>")])
    assert text == ("<image>Question: what colour? Short answer: red<|endofchunk|>"
                    "<image>Question: how many? Short answer: 2<|endofchunk|>"
                    "<image>Question: what shape? Short answer:")
    assert tok.few_shot_question_text("what shape?") == tok.question_text("what shape?")


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    """A tiny Flamingo checkpoint (gates open, so the image changes the answer) with room for a few-shot prompt."""
    from conftest import write_tiny_checkpoints

    path = write_tiny_checkpoints(tmp_path_factory.mktemp("answering"), flamingo_context=64)["flamingo"]
    images = []
    for i, colour in enumerate(["red", "blue", "green"]):
        image = tmp_path_factory.mktemp("img") / f"{i}.png"
        Image.new("RGB", (20, 20), colour).save(image)
        images.append(image)
    return path, images


def test_answer_asks_each_image_its_question_as_the_model_trained(answering):
    import vlm

    path, images = answering
    model = vlm.load(path)
    questions = ["what colour is it?", "how many shapes are there?", "what shape is it?"]
    got = model.answer(images, questions)
    captioner, tok = model.captioner, model.captioner.tokenizer
    alone = [first_answer(captioner.generate_captions(model.preprocess(image), tok.question_text(q), num_beams=1)[0])
             for image, q in zip(images, questions)]
    assert got == alone and all(isinstance(a, str) for a in got)
    # one question for every image; batches of one give the same answers
    assert model.answer(images, "what colour is it?") == [
        model.answer(image, "what colour is it?")[0] for image in images]
    model.batch_size = 1
    assert model.answer(images, questions) == got


def test_answer_with_examples_puts_the_solved_examples_first(answering):
    import vlm

    path, images = answering
    model = vlm.load(path)
    examples = [(images[1], "what colour is it?", "blue")]
    got = model.answer([images[0], images[2]], "what colour is it?", examples=examples)
    captioner = model.captioner
    prompt = ("<image>Question: what colour is it? Short answer: blue<|endofchunk|>"
              "<image>Question: what colour is it? Short answer:")
    shots = model.preprocess([images[1]])
    expected = [first_answer(captioner.generate_captions(torch.stack([shots[0], model.preprocess(q)[0]])[None], prompt,
                                                         num_beams=1)[0]) for q in (images[0], images[2])]
    assert got == expected


def test_answer_refuses_what_does_not_fit_with_one_clear_error(answering, tiny_clip_task, tmp_path):
    import vlm

    path, images = answering
    model = vlm.load(path)
    with pytest.raises(ValueError, match="2 questions for 3 images"):
        model.answer(images, ["a?", "b?"])
    with pytest.raises(ValueError, match="triple"):
        model.answer(images[0], "a?", examples=[(images[1], "blue")])
    with pytest.raises(ValueError, match="context is 64 tokens"):
        model.answer(images[0], "what colour? " * 40)
    clip = tmp_path / "clip.ckpt"
    torch.save({"state_dict": tiny_clip_task.state_dict(), "hyper_parameters": dict(tiny_clip_task.hparams),
                "inference": tiny_clip_task.inference_settings()}, clip)
    with pytest.raises(TypeError, match="answering questions needs a Flamingo checkpoint"):
        vlm.load(clip).answer(images[0], "what colour?")


def test_interleaved_question_records_learn_every_answer_after_the_examples_before_it():
    """images_per_sequence=k: k records in one sequence, laid out as a k-1-shot prompt followed by its answer, the
    loss on every answer (and its end-of-chunk) and nothing else."""
    from conftest import build_trainable

    cfg = _tiny_vqa_task()
    cfg["init_args"]["model"]["init_args"]["decoder"]["init_args"]["context_length"] = 64
    cfg["init_args"]["images_per_sequence"] = 2
    task = build_trainable(cfg)
    tok = task.tokenizer
    questions, answers = ["what colour?", "how many?", "what shape?", "where?", "odd one"], ["red", "2", "star",
                                                                                           "left", "x"]
    images = torch.randn(5, 3, 16, 16)
    batch = {"image": images, "question": questions, "caption": answers, **tok.encode_questions(questions, answers)}
    grouped, ids, labels = task._interleave(batch)
    assert grouped.shape == (2, 2, 3, 16, 16) and torch.equal(grouped[1, 0], images[2])  # the fifth is dropped
    # the sequence is the 1-shot prompt for the second question, then its answer
    prompt = tok.encode_prompts([tok.few_shot_question_text("how many?", [("what colour?", "red")])])["input_ids"][0]
    assert ids[0, :len(prompt)].tolist() == prompt.tolist()
    learned = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    eoc = tok.end_of_chunk_token_id
    assert learned == tok.encode(" red") + [eoc] + tok.encode(" 2") + [eoc, tok.eos_token_id]
    loss = task.compute_loss(grouped, ids, labels)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="sequence of 2 questions starting 'what colour.* takes 81 tokens; the "
                                         "context length is 64"):
        task.tokenizer.encode_question_sequences([[("what colour? " * 20, "red"), ("how many?", "2")]])


def test_a_flamingo_stage_can_start_from_a_trained_flamingo(tmp_path):
    """init_weights: question answering after captioning starts from the captioner's whole model, read once."""
    from conftest import build_trainable

    from vlm.interop.weights import WeightsSourceError

    torch.manual_seed(0)
    first = build_trainable(_tiny_vqa_task())
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(torch.randn_like(p))  # "trained": unlike any fresh initialisation
    path = tmp_path / "captioner.ckpt"
    torch.save({"state_dict": first.state_dict(), "hyper_parameters": dict(first.hparams)}, path)
    cfg = _tiny_vqa_task()
    cfg["init_args"]["init_weights"] = str(path)
    torch.manual_seed(1)
    second = build_trainable(cfg)
    second.setup("fit")
    assert bool(second.pretrained_loaded)
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    with torch.no_grad():
        second.model.cross_attn[0].attn_gate.fill_(0.25)
    second.setup("fit")  # a resumed run (the flag is saved) never reads the file again
    assert second.model.cross_attn[0].attn_gate.item() == 0.25
    other = copy.deepcopy(cfg)
    other["init_args"]["model"]["init_args"]["num_latents"] = 3
    with pytest.raises(WeightsSourceError, match="cannot start from init_weights"):
        build_trainable(other).setup("fit")
