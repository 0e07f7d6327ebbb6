"""Decoding: greedy, beam search and sampling over the KV cache, against step-by-step references and HF."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FP32_EPS

from vlm.generation import few_shot_prompt, generate
from vlm.models.decoder import DecoderLM, convert_gpt2_state_dict

VOCAB, STOP, PAD = 40, 3, 0


@pytest.fixture(scope="module")
def lm() -> DecoderLM:
    torch.manual_seed(0)
    m = DecoderLM(vocab_size=VOCAB, context_length=48, width=32, depth=2, num_heads=4).eval()
    for name, p in m.named_parameters():  # larger block weights: varied continuations, not one repeated token
        if name.startswith("blocks") and p.ndim > 1:
            p.data.mul_(8.0)
    return m


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def prompts(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, VOCAB, (length,), generator=g) for length in (2, 6, 4, 5)[:n]]


def test_greedy_is_argmax_step_by_step(lm):
    ids = prompts(1)[0][None]
    out = generate(lm, ids, max_new_tokens=8)
    seq = ids
    for t in range(8):
        with torch.no_grad():
            nxt = lm(seq)[:, -1].argmax(-1)
        assert out[0, t] == nxt[0]
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert len(set(out[0].tolist())) > 2


def test_greedy_matches_transformers_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.3, bos_token_id=1, eos_token_id=STOP)).eval()
    ours = DecoderLM(vocab_size=VOCAB, context_length=48, width=32, depth=2, num_heads=4).eval()
    ours.load_state_dict(convert_gpt2_state_dict(ref.state_dict()))
    ids = prompts(1)[0][None]
    theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          eos_token_id=STOP, pad_token_id=PAD)[:, ids.shape[1] :]
    mine = generate(ours, ids, max_new_tokens=10, stop_token_ids=[STOP], pad_token_id=PAD)
    assert torch.equal(mine, theirs)
    beams = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, num_beams=3,
                         length_penalty=0.0, early_stopping=True, do_sample=False, eos_token_id=STOP,
                         pad_token_id=PAD)[:, ids.shape[1] :]
    mine = generate(ours, ids, max_new_tokens=10, num_beams=3, length_penalty=0.0, stop_token_ids=[STOP],
                    pad_token_id=PAD)
    assert torch.equal(mine, beams[:, : mine.shape[1]]) and (beams[:, mine.shape[1] :] == PAD).all()


def test_cached_equals_uncached(lm):
    ids, mask = left_pad(prompts())
    for kw in ({}, {"num_beams": 3}):
        a = generate(lm, ids, mask, max_new_tokens=10, stop_token_ids=[STOP], pad_token_id=PAD, **kw)
        b = generate(lm, ids, mask, max_new_tokens=10, stop_token_ids=[STOP], pad_token_id=PAD, use_cache=False,
                     **kw)
        assert torch.equal(a, b)


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_left_padded_equals_one_by_one(lm, beams):
    rows = prompts(4)
    ids, mask = left_pad(rows)
    batched = generate(lm, ids, mask, max_new_tokens=10, num_beams=beams, stop_token_ids=[STOP], pad_token_id=PAD)
    for i, row in enumerate(rows):
        single = generate(lm, row[None], max_new_tokens=10, num_beams=beams, stop_token_ids=[STOP], pad_token_id=PAD)
        assert torch.equal(batched[i, : single.shape[1]], single[0])
        assert (batched[i, single.shape[1] :] == PAD).all()


def test_beam_one_is_greedy(lm):
    ids, mask = left_pad(prompts())
    greedy = generate(lm, ids, mask, max_new_tokens=10, stop_token_ids=[STOP], pad_token_id=PAD)
    beam = generate(lm, ids, mask, max_new_tokens=10, num_beams=1, stop_token_ids=[STOP], pad_token_id=PAD)
    assert torch.equal(greedy, beam)


def test_beam_search_finds_a_likelier_sequence_than_greedy(lm):
    exact_lm = copy.deepcopy(lm).double()

    def logprob(model, prompt: torch.Tensor, new: torch.Tensor) -> float:
        seq = torch.cat([prompt, new])[None]
        with torch.no_grad():
            lp = model(seq).log_softmax(-1)[0, len(prompt) - 1 : -1]
        return float(lp.gather(1, new[:, None]).sum())

    for prompt in prompts(4):
        greedy = generate(lm, prompt[None], max_new_tokens=6)[0]
        beam = generate(lm, prompt[None], max_new_tokens=6, num_beams=4, length_penalty=0.0)[0]
        exact = {name: logprob(exact_lm, prompt, seq) for name, seq in (("beam", beam), ("greedy", greedy))}
        # Beam search ranks by float32 scores, so it may prefer a sequence likelier only by their rounding: each
        # score off by at most 4x a float32 full pass's error from float64 (at least 8 ulps), as in
        # conftest.assert_fp32_close.
        error = max(abs(logprob(lm, prompt, seq) - logprob(exact_lm, prompt, seq)) for seq in (beam, greedy))
        slack = 2 * max(4 * error, 8 * FP32_EPS * max(abs(v) for v in exact.values()))
        assert exact["beam"] >= exact["greedy"] - slack, (exact, slack)


def test_stop_tokens_end_each_row(lm):
    ids, mask = left_pad(prompts())
    free = generate(lm, ids, mask, max_new_tokens=6)
    k = max(t for t in range(6) if free[0, t] not in free[0, :t])  # a token row 0 emits first at step k > 0
    assert k > 0
    out = generate(lm, ids, mask, max_new_tokens=6, stop_token_ids=[int(free[0, k])], pad_token_id=PAD)
    assert torch.equal(out[0, : k + 1], free[0, : k + 1]) and (out[0, k + 1 :] == PAD).all()


def test_sampling(lm):
    ids, mask = left_pad(prompts())
    greedy = generate(lm, ids, mask, max_new_tokens=8)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}):  # degenerate settings are greedy
        assert torch.equal(generate(lm, ids, mask, max_new_tokens=8, do_sample=True, **kw), greedy)
    a = generate(lm, ids, mask, max_new_tokens=8, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(lm, ids, mask, max_new_tokens=8, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(3))
    c = generate(lm, ids, mask, max_new_tokens=8, do_sample=True, temperature=2.0,
                 generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(c, greedy)


def test_suppressed_tokens_are_never_generated(lm):
    ids, mask = left_pad(prompts())
    free = generate(lm, ids, mask, max_new_tokens=8)
    banned = sorted(set(free.flatten().tolist()))[:3]
    out = generate(lm, ids, mask, max_new_tokens=8, suppress_token_ids=banned)
    assert not torch.isin(out, torch.tensor(banned)).any()


def test_prompt_longer_than_context_is_refused(lm):
    with pytest.raises(ValueError, match="context length is 48"):
        generate(lm, torch.ones(1, 48, dtype=torch.long))
    out = generate(lm, torch.ones(1, 45, dtype=torch.long), max_new_tokens=10)
    assert out.shape[1] == 3  # stops at the context limit


def test_few_shot_prompt_layout():
    assert few_shot_prompt(["a red circle", "a blue star"]) == (
        "<image>a red circle<|endofchunk|><image>a blue star<|endofchunk|><image>")
    assert few_shot_prompt(["x"], "A photo of") == "<image>A photo of x<|endofchunk|><image>A photo of"


def test_flamingo_generation_computes_visual_features_once():
    from vlm.models.flamingo import Flamingo
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    decoder = DecoderLM(vocab_size=VOCAB, context_length=48, width=32, depth=2, num_heads=4)
    model = Flamingo(vision, decoder, cross_attn_heads=2, num_latents=4, resampler_depth=1, resampler_heads=2).eval()
    for blk in model.cross_attn:
        blk.attn_gate.data.fill_(1.0)
        blk.mlp_gate.data.fill_(1.0)
    calls = []
    forward_tokens = vision.forward_tokens
    vision.forward_tokens = lambda x: calls.append(len(x)) or forward_tokens(x)
    img = model.image_token_id
    ids, mask = left_pad([torch.tensor([img, 5, 6]), torch.tensor([img])])
    images = torch.randn(2, 3, 16, 16)
    out = generate(model, ids, mask, images=images, max_new_tokens=8, num_beams=2, suppress_token_ids=[img])
    assert calls == [2]  # one vision pass over the batch's images, whatever the number of steps or beams
    uncached = generate(model, ids, mask, images=images, max_new_tokens=8, num_beams=2, suppress_token_ids=[img],
                        use_cache=False)
    assert torch.equal(out, uncached)
    greedy = generate(model, ids, mask, images=images, max_new_tokens=8, suppress_token_ids=[img])
    for i in range(2):  # and each row alone gives the same tokens
        n = int(mask[i].sum())
        alone = generate(model, ids[i : i + 1, -n:], images=images[i : i + 1], max_new_tokens=8,
                         suppress_token_ids=[img])
        assert torch.equal(greedy[i, : alone.shape[1]], alone[0])
    other = generate(model, ids, mask, images=torch.randn(2, 3, 16, 16), max_new_tokens=8, suppress_token_ids=[img])
    assert not torch.equal(other, greedy)  # the images matter


def test_allowed_tokens_only(lm):
    ids, mask = left_pad(prompts())
    allowed = [5, 9, 17, STOP]
    out = generate(lm, ids, mask, max_new_tokens=8, allowed_token_ids=allowed, stop_token_ids=[STOP], pad_token_id=PAD)
    assert torch.isin(out, torch.tensor(allowed + [PAD])).all()
    with torch.no_grad():  # and among them, the most likely one
        first = lm(ids, attention_mask=mask)[:, -1, allowed].argmax(-1)
    assert torch.equal(out[:, 0], torch.tensor(allowed)[first])
    beams = generate(lm, ids, mask, max_new_tokens=8, num_beams=2, allowed_token_ids=allowed, stop_token_ids=[STOP],
                     pad_token_id=PAD, suppress_token_ids=[9])
    assert torch.isin(beams, torch.tensor([5, 17, STOP, PAD])).all()


def _expected_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution written out from its definition, as Hugging Face applies it (temperature, then the
    k most likely tokens, then the smallest set of those whose renormalised probability reaches top_p)."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    ranked = order[:top_k] if top_k else order
    within = probs[ranked] / probs[ranked].sum()
    keep, mass = [], 0.0
    for token, p in zip(ranked, within.tolist()):
        if top_p < 1.0 and mass >= top_p:
            break
        keep.append(token)
        mass += p
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.6),
                                                        (2.0, 8, 0.8)])
def test_sampling_draws_from_the_filtered_distribution(lm, temperature, top_k, top_p):
    """At settings that are not greedy, the first sampled token's frequencies over many rows match the tempered,
    top-k / nucleus-filtered softmax (total variation under 0.03 for 20,000 draws, about 4x the sampling noise)."""
    prompt = prompts(1)[0][None]
    with torch.no_grad():
        logits = lm(prompt)[0, -1]
    expected = _expected_distribution(logits, temperature, top_k, top_p)
    n = 20_000
    out = generate(lm, prompt.expand(n, -1), max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k,
                   top_p=top_p, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, 0], minlength=VOCAB).float() / n
    assert (freq[expected == 0] == 0).all(), "a token outside the top-k / nucleus was sampled"
    assert 0.5 * (freq - expected).abs().sum() < 0.03
    assert (expected > 0).sum() > 1  # a real choice, not greedy in disguise


def _normalised_score(lm, prompt: torch.Tensor, row: torch.Tensor, stops=(STOP,)) -> float:
    """sum log p / length of a generated row (cut after its stop; padding dropped), recomputed without the cache."""
    ends = torch.isin(row, torch.tensor(stops))
    row = row[: int(ends.nonzero()[0]) + 1] if ends.any() else row[row != PAD]
    seq = torch.cat([prompt, row])
    with torch.no_grad():
        logp = lm(seq[None]).log_softmax(-1)[0, :-1].gather(1, seq[1:, None])[-len(row):].sum()
    return float(logp) / len(row)


def _at_least(a: float, b: float) -> bool:
    # recomputed without the cache: the same fp32 sums in another order, so equal up to rounding
    return a >= b - 64 * FP32_EPS * max(1.0, abs(a))


def test_beam_search_returns_its_best_hypotheses_in_order(lm):
    ids, mask = left_pad(prompts(2))
    kw = dict(max_new_tokens=6, num_beams=4, stop_token_ids=[STOP], pad_token_id=PAD, suppress_token_ids=[PAD])
    best = generate(lm, ids, mask, **kw)
    many = generate(lm, ids, mask, num_return_sequences=3, **kw)
    assert many.shape[0] == 2 * 3
    for i in range(2):  # each prompt's first row is the single best; its rows are distinct hypotheses
        rows = many[i * 3:(i + 1) * 3]
        assert torch.equal(rows[0, : best.shape[1]], best[i]) and (rows[0, best.shape[1]:] == PAD).all()
        assert len({tuple(r.tolist()) for r in rows}) == 3
        scores = [_normalised_score(lm, ids[i][mask[i].bool()], r) for r in rows]  # best first
        assert all(_at_least(a, b) for a, b in zip(scores, scores[1:]))
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(lm, ids, mask, max_new_tokens=4, num_beams=2, num_return_sequences=3)


def test_beam_search_without_early_stopping_only_finds_better_hypotheses(lm):
    """The beams move the same way until early stopping would stop; going on can only add finished hypotheses, so
    its best scores at least as well, and better where early stopping settled for a short stub."""
    g = torch.Generator().manual_seed(3)
    ids, mask = left_pad([torch.randint(4, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
                          for _ in range(24)])
    stops = (STOP, 5, 6)  # three ways to stop: short stubs finish early
    better = 0
    for k in (4, 8):
        kw = dict(max_new_tokens=12, num_beams=k, stop_token_ids=list(stops), pad_token_id=PAD,
                  suppress_token_ids=[PAD])
        early = generate(lm, ids, mask, **kw)
        full = generate(lm, ids, mask, early_stopping=False, **kw)
        for i in range(len(ids)):
            prompt = ids[i][mask[i].bool()]
            a, b = (_normalised_score(lm, prompt, rows[i], stops) for rows in (full, early))
            assert _at_least(a, b)
            better += a > b + 1e-3
    assert better > 0, "no prompt where going on found a better hypothesis: the test shows nothing"
