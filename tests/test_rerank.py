"""Captions reranked by a CLIP model: the beam search proposes, CLIP picks (CaptionPredictor.rerank_with and
scripts/caption.py --rerank), on the tiny checkpoints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoints
from PIL import Image

import vlm

ROOT = Path(__file__).resolve().parents[1]
BEAMS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerank")
    paths = write_tiny_checkpoints(tmp)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    for i, image in enumerate(images):
        image.save(tmp / f"{i}.png")
    return {"paths": paths, "images": images, "tmp": tmp}


def candidates(captioner, images) -> list[list[str]]:
    """Each image's BEAMS beam-search captions, best first."""
    flat = captioner.captioner.generate_captions(captioner.preprocess(images), captioner.build_prompt(), None, BEAMS,
                                                 num_return_sequences=BEAMS)
    return [flat[i * BEAMS:(i + 1) * BEAMS] for i in range(len(images))]


def test_the_caption_is_the_candidate_clip_scores_highest(models):
    captioner, clip = vlm.load(models["paths"]["flamingo"]), vlm.load(models["paths"]["clip"])
    images = models["images"]
    proposed = candidates(captioner, images)
    assert any(len(set(c)) > 1 for c in proposed), "the tiny model's beams must differ for this test to mean anything"
    expected = []
    for image, texts in zip(images, proposed):
        scores = clip.similarity(image, texts)[0]
        distinct = sorted({round(float(v), 6) for v in scores}, reverse=True)
        # batches of other sizes round differently: the winner must lead by far more than float32 rounding
        assert len(distinct) == 1 or distinct[0] - distinct[1] > 1e-4
        expected.append(texts[int(scores.argmax())])
    assert captioner.rerank_with(clip, BEAMS).caption(images) == expected
    assert captioner.rerank_with(None).caption(images) == [c[0] for c in proposed]  # off: the beam search's best


def test_clip_overrules_the_beam_order(models, monkeypatch):
    captioner, clip = vlm.load(models["paths"]["flamingo"]), vlm.load(models["paths"]["clip"])
    images = models["images"]
    proposed = candidates(captioner, images)
    favourite = [next(t for t in reversed(texts) if t != texts[0]) for texts in proposed]  # never the beam's best
    image_embeddings = clip.embed_images(images)

    def embed_texts(texts):  # each favourite lies on its image's embedding, every other text opposite to all
        out = -image_embeddings.mean(0, keepdim=True).expand(len(texts), -1).clone()
        for i, text in enumerate(texts):
            if text in favourite:
                out[i] = image_embeddings[favourite.index(text)]
        return torch.nn.functional.normalize(out, dim=-1)

    monkeypatch.setattr(clip, "embed_texts", embed_texts)
    got = captioner.rerank_with(clip, BEAMS).caption(images)
    assert got == favourite and got != [c[0] for c in proposed]


def test_reranking_refuses_what_it_cannot_do(models):
    captioner = vlm.load(models["paths"]["flamingo"])
    with pytest.raises(TypeError, match="CLIP model, not a Flamingo model"):
        captioner.rerank_with(vlm.load(models["paths"]["flamingo"]))
    with pytest.raises(ValueError, match="between 1 and 64"):
        captioner.rerank_with(vlm.load(models["paths"]["clip"]), 0)
    captioner.rerank_with(vlm.load(models["paths"]["clip"]), BEAMS)
    with pytest.raises(ValueError, match="do_sample"):
        captioner.caption(models["images"], do_sample=True)


def run_script(capsys, *argv):
    spec = importlib.util.spec_from_file_location("caption_script", ROOT / "scripts" / "caption.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main([str(a) for a in argv])
    return (code, *capsys.readouterr())


def test_caption_script_reranks(models, capsys):
    paths, tmp = models["paths"], models["tmp"]
    files = [tmp / f"{i}.png" for i in range(3)]
    code, out, err = run_script(capsys, "--checkpoint", paths["flamingo"], "--rerank", paths["clip"],
                                "--rerank-beams", BEAMS, *files)
    assert code == 0, err
    captioner = vlm.load(paths["flamingo"]).rerank_with(vlm.load(paths["clip"]), BEAMS)
    expected = captioner.caption([Image.open(f).convert("RGB") for f in files])
    assert out.splitlines() == [f"{f}: {c}" for f, c in zip(files, expected)]
    code, out, err = run_script(capsys, "--checkpoint", paths["flamingo"], "--rerank", paths["flamingo"], *files)
    assert code == 2 and out == "" and "is a Flamingo model" in err and "CLIP checkpoint" in err
    code, out, err = run_script(capsys, "--checkpoint", paths["flamingo"], "--rerank", tmp / "nope.ckpt", *files)
    assert code == 2 and "not found" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        run_script(capsys, "--checkpoint", paths["flamingo"], "--rerank", paths["clip"], "--rerank-beams", 0, *files)
    assert e.value.code == 2 and "--rerank-beams must be between 1 and 64" in capsys.readouterr().err
