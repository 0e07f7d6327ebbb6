"""The models' contracts as code (vlm.models.protocols): a new decoder family is one CausalDecoder subclass that a
config names as Flamingo's decoder; it trains the bridge and generates (cached = uncached, greedy and beam search)
with nothing registered anywhere; vlm's own decoders are such subclasses and generators."""

from __future__ import annotations

import copy

import torch
from conftest import TINY_FLAMINGO, build_trainable
from torch import Tensor, nn

from vlm.generation import generate
from vlm.models.decoder import DecoderLM
from vlm.models.flamingo import Flamingo
from vlm.models.hf_decoder import HFCausalLM
from vlm.models.layers import Block, KVCache
from vlm.models.protocols import CausalDecoder, Generator


class ToyDecoder(CausalDecoder):
    """A decoder family of its own: sinusoid-free, with a learned scale on the token embeddings and positions added
    per layer. Only the abstract members are written; forward and generation come from the base."""

    def __init__(self, vocab_size: int = 50257, context_length: int = 32, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.vocab_size, self.context_length, self.width, self.embed_dim = vocab_size, context_length, width, width
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(context_length, width) * 0.02)
        self.scale = nn.Parameter(torch.ones(()))
        self.stack = nn.ModuleList(Block(width, 2) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    @property
    def layers(self) -> nn.ModuleList:
        return self.stack

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.tokens(input_ids) * self.scale

    def forward_hidden(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None):
        b, n, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the toy decoder takes unpadded batches")
        x = inputs_embeds + self.positions[past:past + n]
        for i, blk in enumerate(self.stack):
            x = blk(x, is_causal=True, cache=cache, layer_idx=i)
        return self.norm(x)

    @property
    def unembedding_weight(self) -> Tensor:
        return self.tokens.weight

    def unembed(self, hidden, token_ids=None):
        weight = self.tokens.weight
        return hidden @ (weight if token_ids is None else weight[token_ids]).T

    def new_cache(self) -> KVCache:
        return KVCache(len(self.stack))

    @staticmethod
    def reorder_cache(cache: KVCache, index: Tensor) -> None:
        cache.reorder(index)


def _toy_flamingo_task():
    config = copy.deepcopy(TINY_FLAMINGO)
    config["init_args"]["model"]["init_args"]["decoder"] = {"class_path": f"{__name__}.ToyDecoder",
                                                            "init_args": {"context_length": 32}}
    torch.manual_seed(0)
    return build_trainable(config)


def test_vlms_decoders_keep_the_contracts():
    assert issubclass(DecoderLM, CausalDecoder) and issubclass(HFCausalLM, CausalDecoder)
    decoder = DecoderLM(vocab_size=50, context_length=8, width=8, depth=1, num_heads=2)
    assert isinstance(decoder, Generator)
    assert not isinstance(nn.Linear(2, 2), Generator)


def test_a_decoder_family_named_by_a_config_trains_the_bridge():
    task = _toy_flamingo_task()
    assert isinstance(task.model, Flamingo) and isinstance(task.model.decoder, ToyDecoder)
    images = torch.randn(2, 3, 16, 16)
    batch = {"image": images, **task.tokenizer.encode_batch(["a red circle", "a blue star"])}
    loss = task.compute_loss(batch["image"], batch["input_ids"], batch["labels"])
    loss.backward()
    assert torch.isfinite(loss)
    bridge = [p.grad for p in task.model.cross_attn.parameters() if p.grad is not None]
    assert bridge and any(g.abs().sum() > 0 for g in bridge)
    assert all(p.grad is None for p in task.model.decoder.parameters())  # frozen, as any decoder is


def test_its_generation_is_the_base_protocol_cached_or_not():
    task = _toy_flamingo_task().eval()
    with torch.no_grad():
        for blk in task.model.cross_attn:  # open the gates: the image matters
            blk.attn_gate.fill_(1.0)
            blk.mlp_gate.fill_(1.0)
    decoder = task.model.decoder
    ids = torch.tensor([[5, 7, 9, 11]])
    outs = {cache: generate(decoder, ids, max_new_tokens=6, use_cache=cache) for cache in (True, False)}
    assert outs[True].shape == (1, 6) and torch.equal(outs[True], outs[False])
    beams = {cache: generate(decoder, ids.repeat(2, 1), max_new_tokens=5, num_beams=3, use_cache=cache)
             for cache in (True, False)}
    assert torch.equal(beams[True], beams[False])  # reorder_state through the toy's reorder_cache
    images = torch.randn(2, 3, 16, 16)
    captions = task.generate_captions(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
