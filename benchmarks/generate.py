"""``generate``: greedy decoding with our DecoderLM against ``transformers``' ``generate`` on GPT-2.

Both hold the same weights (a GPT-2 small-size model, randomly initialised by ``transformers`` and converted with
:func:`~vlm.models.decoder.convert_gpt2_state_dict`): a 16-token prompt, 64 new tokens, greedy, with the KV cache
and without it (recomputing the whole prefix at every step), and whether both produce the same tokens; beam search
(3 beams) over a batch of prompts, as a folder is captioned. Then
Flamingo captioning, where the images are encoded and resampled once per caption and their cross-attention keys
and values reused at every step. Ours runs with :func:`vlm.kernels.use_cpu_kernels` applied, as the entry points
apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from benchmarks.core import Row, Settings, cpu_kernels, interleaved_medians, make_row
from benchmarks.flamingo import default_flamingo_task
from vlm.generation import generate
from vlm.models.decoder import DecoderLM, convert_gpt2_state_dict

SUITE = "generate"


def gpt2_config(quick: bool, context_length: int = 1024):
    from transformers import GPT2Config

    size = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0) if quick else {}
    return GPT2Config(n_positions=context_length, **size)


def gpt2_pair(quick: bool, context_length: int = 1024, seed: int = 0) -> tuple[DecoderLM, nn.Module]:
    """Our DecoderLM and a ``transformers`` GPT2LMHeadModel of the same size, holding identical weights."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = gpt2_config(quick, context_length)
    peer = GPT2LMHeadModel(cfg).eval()
    peer.generation_config.eos_token_id = None  # always generate the full budget, as ours does without stop ids
    peer.generation_config.pad_token_id = 0
    ours = DecoderLM(cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head).eval()
    ours.load_state_dict(convert_gpt2_state_dict(peer.state_dict()))
    return ours, peer


def gpt2_size_decoder(quick: bool, context_length: int = 1024) -> DecoderLM:
    return gpt2_pair(quick, context_length)[0]


def decoder_greedy_fn(model: DecoderLM, prompt: Tensor, new_tokens: int, use_cache: bool) -> Callable[[], Tensor]:
    return lambda: generate(model, prompt, max_new_tokens=new_tokens, use_cache=use_cache)


def hf_greedy_fn(model: nn.Module, prompt: Tensor, new_tokens: int, use_cache: bool) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)  # fmt: skip
        return out[:, prompt.shape[1] :]

    return run


def decoder_rows(settings: Settings) -> Iterator[Row]:
    ours, peer = gpt2_pair(settings.quick)
    cpu_kernels(ours, settings)
    new = settings.pick(64, 8)
    prompt = torch.randint(0, ours.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    label = settings.pick("GPT-2 small size", "tiny GPT-2")
    with torch.no_grad():
        diff = (ours(prompt) - peer(prompt).logits).abs().max().item()
    yield make_row(SUITE, f"{label} prompt logits max |ours - transformers|", diff, "abs diff")
    tokens = {}
    for use_cache in (True, False):
        fns = {
            "ours": decoder_greedy_fn(ours, prompt, new, use_cache),
            "peer": hf_greedy_fn(peer, prompt, new, use_cache),
        }
        tokens[use_cache] = {k: fn() for k, fn in fns.items()}
        t = interleaved_medians(fns, repeats=settings.repeats)
        cache = "KV cache" if use_cache else "no cache"
        yield make_row(SUITE, f"{label} greedy {new} new tokens, {cache}", new / t["ours"], "tok/s", new / t["peer"])
        tokens[use_cache]["seconds"] = t["ours"]
    same = (tokens[True]["ours"] == tokens[True]["peer"]).float().mean().item()
    yield make_row(SUITE, f"{label} greedy tokens equal to transformers' (KV cache)", 100 * same, "%")
    same = (tokens[True]["ours"] == tokens[False]["ours"]).float().mean().item()
    yield make_row(SUITE, f"{label} greedy tokens equal with and without cache", 100 * same, "%")
    speedup = tokens[False]["seconds"] / tokens[True]["seconds"]
    yield make_row(SUITE, f"{label} greedy {new} new tokens: KV cache speed-up over recomputing", speedup, "x")


def beam_rows(settings: Settings) -> Iterator[Row]:
    """Beam search (3 beams) over a batch of prompts, as captioning a folder runs it: ours against ``transformers``'
    ``generate(num_beams=3)`` on the same GPT-2-size decoder and weights, both with the KV cache."""
    ours, peer = gpt2_pair(settings.quick)
    cpu_kernels(ours, settings)
    b, new = settings.pick(8, 2), settings.pick(20, 4)
    prompt = torch.randint(0, ours.vocab_size, (b, 16), generator=torch.Generator().manual_seed(1))

    def peer_beams() -> Tensor:
        with torch.no_grad():
            out = peer.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, num_beams=3, do_sample=False)  # fmt: skip
        return out[:, prompt.shape[1]:]

    fns = {"ours": lambda: generate(ours, prompt, max_new_tokens=new, num_beams=3), "peer": peer_beams}
    same = (fns["ours"]() == fns["peer"]()).float().mean().item()
    t = interleaved_medians(fns, repeats=settings.repeats)
    label = settings.pick("GPT-2 small size", "tiny GPT-2")
    yield make_row(SUITE, f"{label} beam search (3 beams), {b} prompts x {new} new tokens, KV cache", b / t["ours"],
                   "texts/s", b / t["peer"])  # fmt: skip
    yield make_row(SUITE, f"{label} beam-search tokens equal to transformers'", 100 * same, "%")


def flamingo_rows(settings: Settings) -> Iterator[Row]:
    task = cpu_kernels(default_flamingo_task(), settings)
    size = task.image_size
    images = torch.randn(settings.pick(4, 1), 3, size, size, generator=torch.Generator().manual_seed(0))
    new = settings.pick(20, 4)

    def caption(use_cache: bool) -> Callable[[], object]:
        return lambda: task.captioner().generate_tokens(images, max_new_tokens=new, use_cache=use_cache)

    # Interleaved, like the decoder rows: the two are close at this size and the machine is noisy.
    t = interleaved_medians({"cache": caption(True), "none": caption(False)}, repeats=min(settings.repeats, 3))
    # Both encode and resample the images once per caption; without the KV cache the decoder recomputes the text.
    yield make_row(SUITE, f"Flamingo default config captioning b={images.shape[0]}, KV cache + media encoded once",
                   images.shape[0] / t["cache"], "img/s")  # fmt: skip
    yield make_row(SUITE, f"Flamingo default config captioning b={images.shape[0]}, no KV cache (media encoded once)",
                   images.shape[0] / t["none"], "img/s")  # fmt: skip


def run(settings: Settings) -> Iterator[Row]:
    yield from decoder_rows(settings)
    yield from beam_rows(settings)
    yield from flamingo_rows(settings)
