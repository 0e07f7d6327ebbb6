"""``vlm eval``: few-shot selection (random, RICES), the per-task loops as wiring over the Flamingo's own generation
and forward, prompts that do not fit, and the command's JSON, table and errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_checkpoints
from PIL import Image

from vlm.__main__ import main
from vlm.fewshot import (
    FewShotEval,
    Item,
    class_log_likelihoods,
    continuation_ids,
    exclusions,
    prompt_ids,
    prompt_text,
    random_select,
    read_items,
    rices_select,
)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}


def _write(folder, rows, images):
    """A folder with ``images`` (name -> colour) and ``metadata.jsonl`` of ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in images.items():
        pixels = Image.new("RGB", (20, 20), COLOURS[colour])
        pixels.putpixel((len(name) % 20, 3), (0, 0, 0))  # images of one colour differ in content too
        pixels.save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny Flamingo (context 64, gates open) and CLIP checkpoints, and a dataset root with train/validation splits of
    VQA records, captions and labels."""
    root = tmp_path_factory.mktemp("fewshot")
    ckpts = write_tiny_checkpoints(root, flamingo_context=64)
    colours = ["red", "blue", "green", "white"]
    for kind in ("vqa", "caption", "classify"):
        for split, n in (("train", 8), ("validation", 4)):
            images = {f"{split}{i}.png": colours[i % 4] for i in range(n)}
            if kind == "vqa":
                rows = [{"file_name": f, "question": "what colour?", "answers": [c, c, "grey"], "heldout": i % 2 == 0}
                        for i, (f, c) in enumerate(images.items())]  # fmt: skip
            elif kind == "caption":
                rows = [{"file_name": f, "caption": f"a {c} square"} for f, c in images.items()]
                rows += [{"file_name": f, "caption": f"{c} picture"} for f, c in images.items()]  # a second reference
            else:
                rows = [{"file_name": f, "caption": c, "label": c} for f, c in images.items()]
            _write(root / kind / split, rows, images)
    return root, ckpts


# ----------------------------------------------------------------------------------------------- selection
def test_rices_picks_the_nearest_examples_most_similar_last_and_never_the_query():
    support = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]), dim=1)
    queries = support[[0, 2]].clone()  # support == data: query i is support row 0, query 1 is row 2
    chosen = rices_select(queries, support, 2, [{0}, {2}])
    # query 0 (1, 0): cosines 0.8 (row 1), 0.6 (row 3), 0 (row 2), -1 (row 4): the two nearest, the nearest last
    assert chosen[0] == [3, 1]
    assert chosen[1] == [1, 3]  # (0, 1): row 3 (0.8) is nearest, then row 1 (0.6); never row 2 itself
    assert rices_select(queries, support, 4, [set(), set()])[0] == [2, 3, 1, 0]  # nothing excluded: itself last
    with pytest.raises(ValueError, match="fewer than 5"):
        rices_select(queries, support, 5, [{0}, {2}])
    with pytest.raises(ValueError, match="fewer than 6"):
        rices_select(queries, support, 6, [set(), set()])  # more than the pool holds


def test_exclusions_cover_the_same_path_and_the_same_content(tmp_path):
    a = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(a)
    shutil.copy(a, tmp_path / "copy.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    items = [Item(p, "x", ["x"]) for p in (a, tmp_path / "copy.png", tmp_path / "b.png")]
    query = Item(tmp_path / "sub" / ".." / "a.png", "x", ["x"])  # another spelling of a.png
    assert exclusions([query], items) == [{0, 1}]
    assert exclusions(items, items) == [{0, 1}, {0, 1}, {2}]


def test_random_selection_is_seeded_differs_across_trials_and_skips_the_query():
    excluded = [{i} for i in range(6)]
    first = random_select(6, 3, excluded, seed=0, trial=0)
    assert first == random_select(6, 3, excluded, seed=0, trial=0)
    assert first != random_select(6, 3, excluded, seed=0, trial=1)
    assert first != random_select(6, 3, excluded, seed=1, trial=0)
    for trial in range(5):
        for i, row in enumerate(random_select(6, 3, excluded, seed=0, trial=trial)):
            assert len(row) == len(set(row)) == 3 and i not in row and all(0 <= j < 6 for j in row)
    with pytest.raises(ValueError, match="5 examples besides the query, 6 needed"):
        random_select(6, 6, excluded, seed=0, trial=0)


# ------------------------------------------------------------------------------------------------- the loops
def _harness(setup, task, support_split="train"):
    import vlm

    root, ckpts = setup
    predictor = vlm.load(ckpts["flamingo"], batch_size=4)
    queries = read_items(task, root / task / "validation")
    pool = read_items(task, root / task / support_split)
    classes = sorted({i.text for i in queries + pool}) if task == "classify" else []
    harness = FewShotEval(predictor, task, queries, pool, classes, seed=0, trials=2)
    harness.check_images()
    return harness


def test_vqa_answers_are_those_of_generate_answers_with_the_same_examples(setup):
    harness = _harness(setup, "vqa")
    (row,) = harness.run([2], ["random"], batch_size=3)
    assert row["fits"] and len(row["runs"]) == 2 and row["queries"] == 4
    captioner, pre = harness.predictor.captioner, harness.predictor.preprocess
    for p in row["runs"][0]["predictions"] + row["runs"][1]["predictions"][:1]:  # batches of 3 vs one by hand
        q, examples = harness.queries[p["query"]], [harness.support[j] for j in p["examples"]]
        images = pre([e.path for e in examples] + [q.path])[None]  # (1, k + 1, 3, H, W)
        by_hand = captioner.generate_answers(images, [q.question], [[(e.question, e.text) for e in examples]])
        assert p["prediction"] == by_hand[0]
    assert row["runs"][0]["predictions"][0]["examples"] != row["runs"][1]["predictions"][0]["examples"] or \
        row["runs"][0]["predictions"][1]["examples"] != row["runs"][1]["predictions"][1]["examples"]
    assert {"vqa_accuracy", "vqa_accuracy_heldout", "vqa_accuracy_seen"} <= set(row["runs"][0]["metrics"])


def test_classification_picks_the_class_with_the_highest_mean_log_likelihood(setup):
    harness = _harness(setup, "classify")
    model, tok = harness.predictor.captioner.model, harness.tok
    names = harness.classes
    query, examples = harness.queries[0], harness.support[:2]
    text = prompt_text("classify", tok, query, examples)
    assert text == "<image>red<|endofchunk|><image>blue<|endofchunk|><image>"
    images = harness.predictor.preprocess([e.path for e in examples] + [query.path])[None]
    prefix = prompt_ids(tok, [text])[0]
    got = class_log_likelihoods(harness.predictor.captioner, images, [prefix],
                                [continuation_ids(tok, n) for n in names])[0]
    manual = []
    reference = copy.deepcopy(model).double()  # float64: the harness's float32 result is compared with exact values
    for name in names:  # independently: the full sequence's logits, log_softmax, the name's tokens, their mean
        cont = tok.encode(name)
        ids = torch.tensor([prefix + cont])
        with torch.no_grad():
            logp = reference(images.double(), ids).log_softmax(-1)[0]
        manual.append(torch.stack([logp[len(prefix) + t - 1, c] for t, c in enumerate(cont)]).mean())
    manual = torch.stack(manual).float()
    # Bound: float32 rounding of a width-16, one-block model's logits, then a log-softmax over 50,257 entries, whose
    # (tree-summed) log-sum-exp errs by about log2(50,257) x 6e-8 x |logit| (|logit| <= ~11): ~1e-5, inside 1e-4.
    torch.testing.assert_close(got, manual, rtol=0, atol=1e-4)
    # the harness, with those examples fixed, predicts the argmax
    harness.select = lambda select, k, trial: [[0, 1] for _ in harness.queries]
    (row,) = harness.run([2], ["random"], batch_size=4)
    first = row["runs"][0]["predictions"][0]
    assert first["examples"] == [0, 1] and first["prediction"] == names[int(manual.argmax())]


def test_captioning_prompts_show_the_examples_captions_and_score_cider(setup):
    harness = _harness(setup, "caption")
    assert len(harness.queries) == 4 and harness.queries[0].references == ["a red square", "red picture"]
    (row,) = harness.run([1], ["random"], batch_size=4)
    p = row["runs"][0]["predictions"][0]
    example = harness.support[p["examples"][0]]
    images = harness.predictor.preprocess([example.path, harness.queries[0].path])[None]
    prompt = f"<image>{example.text}<|endofchunk|><image>"
    assert p["prediction"] == harness.predictor.captioner.generate_captions(images, [prompt])[0]
    assert set(row["runs"][0]["metrics"]) == {"cider", "bleu4"} and row["mean"] == pytest.approx(
        sum(r["metrics"]["cider"] for r in row["runs"]) / 2)


def test_a_shot_count_that_does_not_fit_is_reported_and_the_others_run(setup):
    harness = _harness(setup, "vqa")
    rows = harness.run([0, 1, 7], ["random"], batch_size=4)
    assert [r["fits"] for r in rows] == [True, True, False]
    assert rows[2]["prompt_tokens"] > 64 == rows[2]["context_length"] and "takes" in rows[2]["skipped"]
    assert "runs" not in rows[2] and rows[1]["runs"]


# ---------------------------------------------------------------------------------------------- the command
def _eval(setup, tmp_path, *extra, task="vqa"):
    root, ckpts = setup
    return ["eval", "--checkpoint", str(ckpts["flamingo"]), "--task", task, "--data",
            str(root / task / "validation"), "--shots", "0,2", "--trials", "2", *extra]


def test_vlm_eval_writes_the_json_prints_the_table_and_is_deterministic(setup, tmp_path, capsys):
    root, ckpts = setup
    args = _eval(setup, tmp_path, "--select", "random,rices", "--clip", str(ckpts["clip"]))
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    assert main([*args, "--json", "--out", str(tmp_path / "b.json")]) == 0  # a second run, the JSON on stdout
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text()) == json.loads(capsys.readouterr().out)
    assert a["support"].endswith("train") and a["metric"] == "vqa_accuracy" and a["queries"] == 4
    assert [(r["select"], r["shots"], len(r["runs"])) for r in a["results"]] == [
        ("random", 0, 1), ("random", 2, 2), ("rices", 0, 1), ("rices", 2, 1)]
    for row in a["results"]:
        line = next(x for x in table.splitlines() if x.split()[:2] == [row["select"], str(row["shots"])])
        assert f"{row['mean']:.4f} ± {row['std']:.4f}" in line
    assert "deterministic" in table and "vqa_accuracy" in table.splitlines()[1]


def test_vlm_eval_limit_samples_the_queries_with_the_seed_in_file_order(setup, tmp_path, capsys):
    def paths(seed: int) -> list[str]:
        args = _eval(setup, tmp_path, "--shots", "0", "--limit", "2", "--seed", str(seed), "--json")
        assert main(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["queries"] == 2
        return [Path(p["path"]).name for p in result["results"][0]["runs"][0]["predictions"]]

    picked = {seed: paths(seed) for seed in range(4)}
    assert paths(0) == picked[0]  # the same seed, the same queries
    assert len({tuple(p) for p in picked.values()}) > 1  # another seed, another subset (6 subsets of 4 queries)
    order = [f"validation{i}.png" for i in range(4)]
    assert all(p == sorted(p, key=order.index) for p in picked.values())


def test_vlm_eval_rices_can_reuse_an_index_of_the_support_folder(setup, tmp_path, capsys, monkeypatch):
    root, ckpts = setup
    assert main(["index", "--checkpoint", str(ckpts["clip"]), "--images", str(root / "vqa" / "train"),
                 "--out", str(tmp_path / "train.idx")]) == 0
    args = _eval(setup, tmp_path, "--select", "rices", "--clip", str(ckpts["clip"]), "--json")
    with monkeypatch.context() as m:  # the folder named by a relative path, as a user in its parent would
        m.chdir(root)
        relative = [("vqa/validation" if a == str(root / "vqa" / "validation") else a) for a in args]
        assert main(relative) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*args, "--index", str(tmp_path / "train.idx")]) == 0
    indexed = json.loads(capsys.readouterr().out)

    def runs(result: dict) -> list:  # the queries' paths are written as given (relative or not)
        return [[{**run, "predictions": [{k: v for k, v in p.items() if k != "path"} for p in run["predictions"]]}
                 for run in r["runs"]] for r in result["results"]]

    assert runs(indexed) == runs(plain)


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("clip as checkpoint", "--checkpoint takes a Flamingo"),
    ("unknown task", "--task must be one of"),
    ("rices without clip", "needs --clip"),
    ("index of another clip", "built with another CLIP"),
    ("index of another folder", "not the support images"),
    ("no support", "give --support"),
])
def test_vlm_eval_user_errors_are_one_line_and_exit_2(setup, tmp_path, capsys, case, message):
    root, ckpts = setup
    args = _eval(setup, tmp_path)
    if case == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nowhere")
    elif case == "clip as checkpoint":
        args[args.index("--checkpoint") + 1] = str(ckpts["clip"])
    elif case == "unknown task":
        args[args.index("--task") + 1] = "detect"
    elif case == "rices without clip":
        args += ["--select", "rices"]
    elif case == "index of another clip":
        other = tmp_path / "other.ckpt"
        state = torch.load(ckpts["clip"], weights_only=False)
        state["state_dict"] = {k: v + 1 for k, v in state["state_dict"].items()}
        torch.save(state, other)
        assert main(["index", "--checkpoint", str(other), "--images", str(root / "vqa" / "train"),
                     "--out", str(tmp_path / "other.idx")]) == 0
        capsys.readouterr()
        args += ["--select", "rices", "--clip", str(ckpts["clip"]), "--index", str(tmp_path / "other.idx")]
    elif case == "index of another folder":
        assert main(["index", "--checkpoint", str(ckpts["clip"]), "--images", str(root / "vqa" / "validation"),
                     "--out", str(tmp_path / "val.idx")]) == 0
        capsys.readouterr()
        args += ["--select", "rices", "--clip", str(ckpts["clip"]), "--index", str(tmp_path / "val.idx")]
    else:
        shutil.copytree(root / "vqa" / "validation", tmp_path / "queries")
        args[args.index("--data") + 1] = str(tmp_path / "queries")
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm eval: error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_vlm_eval_leaves_out_an_unreadable_image_and_exits_1(setup, tmp_path, capsys):
    root, _ = setup
    for split in ("train", "validation"):
        shutil.copytree(root / "vqa" / split, tmp_path / split)
    (tmp_path / "validation" / "validation1.png").write_bytes(b"not a png")
    args = _eval(setup, tmp_path, "--shots", "1", "--trials", "1", "--json")
    args[args.index("--data") + 1] = str(tmp_path / "validation")
    assert main(args) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["queries"] == 3 and list(result["failed"]) == [str(tmp_path / "validation" / "validation1.png")]
    assert [p["query"] for p in result["results"][0]["runs"][0]["predictions"]] == [0, 1, 2]
    assert "skipped" in captured.err and "validation1.png" in captured.err
