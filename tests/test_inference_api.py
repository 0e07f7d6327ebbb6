"""``vlm.load``: every source kind, every image kind, batching, the wrong method for a model, and results equal to
the library functions they wrap (so the API adds convenience, never different numbers)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import FP32_EPS, TINY_FLAMINGO, assert_fp32_close, write_tiny_checkpoints
from PIL import Image

import vlm
from vlm.data.images import ImageLoadError
from vlm.formats import CheckpointError, build_task, export_task
from vlm.formats.load import load_task
from vlm.inference import CaptionPredictor, CLIPPredictor, VisionPredictor
from vlm.zero_shot import build_classifier, classify


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    out = write_tiny_checkpoints(tmp)
    for name in ("clip", "flamingo"):
        out[f"{name}_export"] = export_task(load_task(out[name]), tmp / f"{name}_export")
    lm = build_task({"class_path": "vlm.tasks.language.LanguageModelTask",
                     "init_args": {"model": TINY_FLAMINGO["init_args"]["model"]["init_args"]["decoder"]}})
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}, tmp / "lm.ckpt")
    out["lm"] = tmp / "lm.ckpt"
    rng = np.random.default_rng(0)
    out["images"] = []
    for i in range(5):
        path = tmp / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        out["images"].append(path)
    return out


def _float64(model: CLIPPredictor) -> torch.nn.Module:
    """The predictor's CLIP in float64: the reference its float32 results are measured against, since batches of
    other sizes, or the same values in other memory, may round differently on another CPU."""
    return copy.deepcopy(model.model).double()


def test_load_returns_the_right_kind(files):
    assert isinstance(vlm.load(files["clip"]), CLIPPredictor)
    assert isinstance(vlm.load(files["clip_export"]), CLIPPredictor)
    assert isinstance(vlm.load(files["flamingo"]), CaptionPredictor)
    assert isinstance(vlm.load(str(files["flamingo_export"])), CaptionPredictor)
    with pytest.raises(CheckpointError, match="holds a LanguageModelTask: vlm.load serves CLIP"):
        vlm.load(files["lm"])
    with pytest.raises(CheckpointError, match="not found"):
        vlm.load(files["lm"].parent / "missing.ckpt")


@pytest.mark.parametrize("name", ["clip", "clip_export", "flamingo", "flamingo_export"])
def test_a_file_is_read_once_in_one_call_from_the_api_into_formats(files, name, monkeypatch):
    """``vlm.load`` -> ``vlm.inference.load`` -> ``vlm.formats.load_model`` (the file read once, the model built)
    -> the predictor: one call from the API module into ``vlm.formats`` and nothing back and forth; a file with
    inference settings never builds its training task."""
    import sys
    from pathlib import Path

    from vlm.formats import checkpoint
    from vlm.formats import load as formats_load

    reads = []  # the readers of a checkpoint and of an export's two files, where vlm.formats.load calls them
    for module, fn in ((checkpoint, "read_archive"), (formats_load, "read_export_config"),
                       (formats_load, "read_export_weights")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _fn=fn, **k: reads.append(_fn) or _real(*a, **k))
    monkeypatch.setattr(formats_load, "load_task", lambda *a, **k: pytest.fail("the training task was built"))
    package = Path(vlm.__file__).parent
    api, formats = str(package / "inference.py"), str(package / "formats")
    crossings = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_filename == api:
            if frame.f_code.co_filename.startswith(formats) and frame.f_code.co_name != "<module>":
                crossings.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        predictor = vlm.load(files[name])
    finally:
        sys.setprofile(None)
    assert crossings == ["load_model"]
    assert reads == (["read_archive"] if "export" not in name else ["read_export_config", "read_export_weights"])
    assert isinstance(predictor, CLIPPredictor if name.startswith("clip") else CaptionPredictor)


def test_classify_equals_the_zero_shot_library(files):
    model = vlm.load(files["clip"])
    labels = ["red circle", "blue square", "green star"]
    results = model.classify(files["images"], labels, top_k=2)
    assert len(results) == 5 and all(len(r) == 2 for r in results)
    batch = model.preprocess(files["images"])
    probs = classify(model.model, batch, build_classifier(model.model, model.tokenizer, labels, model.templates))
    exact_model = _float64(model)
    exact = classify(exact_model, batch.double(), build_classifier(exact_model, model.tokenizer, labels,
                                                                    model.templates))
    top = probs.topk(2, dim=1)
    for result, indices in zip(results, top.indices):
        assert [label for label, _ in result] == [labels[i] for i in indices.tolist()]
    got = torch.tensor([[p for _, p in result] for result in results])
    # the API's probabilities as close to the float64 ones as the library's float32 ones
    assert_fp32_close(got, top.values, exact.gather(1, top.indices))
    one = model.classify(files["images"][0], labels)  # a single image: still one list per image
    assert len(one) == 1 and len(one[0]) == 3 and one[0][0][0] == results[0][0][0]
    other = model.classify(files["images"][:1], labels, templates=["a photo of a {}", "{}"])
    assert other[0] != one[0]  # the templates are used


def test_every_image_kind_gives_the_same_embedding(files):
    model = vlm.load(files["clip"])
    path = files["images"][1]
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)
    kinds = [path, str(path), pil, array, array.astype(np.float32) / 255.0,
             torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array).permute(2, 0, 1).float() / 255.0]
    embeddings = torch.cat([model.embed_images(k) for k in kinds])
    # every kind becomes the same uint8 pixels: each embedding as close to the float64 one as the library's
    pixels = model.preprocess(path)
    with torch.no_grad():
        expected = model.model.encode_image(pixels, normalize=True).expand_as(embeddings)
        exact = _float64(model).encode_image(pixels.double(), normalize=True).expand_as(embeddings)
    assert_fp32_close(embeddings, expected, exact)
    # unit length: a float32 norm of d terms is off by at most (d/2 + 1) ulps, the division by it by one more,
    # and the norm taken here by another d/2 + 1
    bound = (embeddings.shape[-1] + 3) * FP32_EPS
    assert (embeddings.norm(dim=-1) - 1).abs().max().item() <= bound
    batch = np.stack([array, array])  # a 4-d array is a batch
    assert model.embed_images(batch).shape[0] == 2
    with pytest.raises(ValueError, match="image array must be"):
        model.embed_images(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="no such file"):
        model.embed_images(path.parent / "nope.png")


def test_batching_does_not_change_results(files):
    big, small = vlm.load(files["clip"]), vlm.load(files["clip"], batch_size=2)
    texts = ["a red circle", "a blue square", "a tiny green star"]
    exact_model = _float64(big)  # batches of 2 and of 5 take other float32 kernels: measured against float64
    with torch.no_grad():
        exact_images = exact_model.encode_image(big.preprocess(files["images"]).double(), normalize=True)
        exact_texts = exact_model.encode_text(big.tokenizer(texts), normalize=True)
    images = big.embed_images(files["images"])
    assert_fp32_close(small.embed_images(files["images"]), images, exact_images, msg="images")
    assert_fp32_close(small.embed_texts(texts), big.embed_texts(texts), exact_texts, msg="texts")
    sim = big.similarity(files["images"], texts)
    assert sim.shape == (5, 3)
    assert_fp32_close(sim, images @ big.embed_texts(texts).T, exact_images @ exact_texts.T, msg="similarity")


def test_caption_equals_the_captioner_and_uses_examples(files):
    model = vlm.load(files["flamingo"], batch_size=2)
    images = files["images"][:3]
    captions = model.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == model.captioner.generate_captions(model.preprocess(images))
    examples = [(files["images"][3], "a small red circle"), (files["images"][4], "a large blue star")]
    few = model.caption(images, examples=examples)
    from vlm.generation import few_shot_prompt

    shots = model.preprocess([files["images"][3], files["images"][4]])
    stacked = torch.cat([shots.unsqueeze(0).expand(3, *shots.shape), model.preprocess(images).unsqueeze(1)], 1)
    prompt = few_shot_prompt(["a small red circle", "a large blue star"], model.captioner.tokenizer.prompt)
    assert few == model.captioner.generate_captions(stacked, prompt)
    with pytest.raises(ValueError, match="1 <image> marker"):
        model.caption(images, prompt="<image>x", examples=examples)


def test_a_method_the_model_cannot_serve_is_one_clear_error(files):
    clip, flamingo = vlm.load(files["clip"]), vlm.load(files["flamingo"])
    with pytest.raises(TypeError, match="is a CLIP model: it classifies.*captioning needs a Flamingo checkpoint"):
        clip.caption(files["images"][0])
    with pytest.raises(TypeError, match="is a Flamingo model: it captions images and answers questions about them; "
                                        "zero-shot classification needs"):
        flamingo.classify(files["images"][0], ["a", "b"])


def test_open_clip_source_with_a_local_weights_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    (tmp_path / "vlm-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "vlm-test-tiny.json")
    torch.manual_seed(0)
    peer = open_clip.create_model("vlm-test-tiny").eval()
    torch.save(peer.state_dict(), tmp_path / "weights.pt")
    model = vlm.load("open_clip:vlm-test-tiny", weights=tmp_path / "weights.pt")
    x = torch.rand(3, 32, 32)
    exact_peer = copy.deepcopy(peer).double()  # ours as close to open_clip's float64 result as its float32 one
    with torch.no_grad():
        expected = torch.nn.functional.normalize(peer.encode_image(model.preprocess(x)), dim=-1)
        exact = torch.nn.functional.normalize(exact_peer.encode_image(model.preprocess(x).double()), dim=-1)
    assert_fp32_close(model.embed_images(x), expected, exact, msg="image")
    tokens = open_clip.get_tokenizer("vlm-test-tiny")(["a diagram"])
    with torch.no_grad():
        text = torch.nn.functional.normalize(peer.encode_text(tokens), dim=-1)
        exact = torch.nn.functional.normalize(exact_peer.encode_text(tokens), dim=-1)
    assert_fp32_close(model.embed_texts("a diagram"), text, exact, msg="text")
    with pytest.raises(CheckpointError, match="give the local weights file"):
        vlm.load("open_clip:vlm-test-tiny")


def test_timm_source_with_a_local_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    torch.save(peer.state_dict(), tmp_path / "vit.pt")
    model = vlm.load("timm:vit_tiny_patch16_224", weights=tmp_path / "vit.pt")
    assert isinstance(model, VisionPredictor)
    x = torch.rand(3, 224, 224)
    exact_peer = copy.deepcopy(peer).double()  # ours as close to timm's float64 result as its float32 one
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            peer.forward_head(peer.forward_features(model.preprocess(x)), pre_logits=True), dim=-1)
        exact = torch.nn.functional.normalize(
            exact_peer.forward_head(exact_peer.forward_features(model.preprocess(x).double()), pre_logits=True), dim=-1)
    assert_fp32_close(model.embed_images(x), expected, exact)
    with pytest.raises(TypeError, match="is a vision model: it embeds images; zero-shot classification"):
        model.classify(x, ["a", "b"])
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="timm:vit_tiny_patch16_224 with"):
        vlm.load("timm:vit_tiny_patch16_224", weights=tmp_path / "bad.pt")
