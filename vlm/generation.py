"""Decoding: greedy, beam search and temperature / nucleus (top-p) sampling over a KV cache.

Any model with the generation protocol (:class:`~vlm.models.protocols.Generator`) works
(:class:`~vlm.models.decoder.DecoderLM`, :class:`~vlm.models.hf_decoder.HFCausalLM`,
:class:`~vlm.models.flamingo.Flamingo`):

- ``start_generation(use_cache, **inputs) -> state``: one-off work (Flamingo encodes and resamples the images here,
  once, and projects their keys/values for every cross-attention layer);
- ``step(input_ids, attention_mask, state, token_ids=None) -> logits (b, vocab)`` of the next token (only those of
  ``token_ids`` when given: a closed vocabulary costs only its own logits): with a cache ``input_ids`` are only the
  new tokens, without one the whole sequence; ``attention_mask`` always covers the whole sequence;
- ``reorder_state(state, index)``: selects batch rows (beam search).

Batches are left-padded (:meth:`~vlm.data.gpt2_tokenizer.FlamingoTokenizer.encode_prompts`): every row's next token
then sits in the last column, and positions count real tokens only, so a padded row decodes as it would alone.
Generation of a row stops at any of ``stop_token_ids`` (``<|endofchunk|>``, end-of-text); the returned ids include
the stop token and are padded after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.data.gpt2_tokenizer import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from vlm.models.protocols import Generator


class _Candidates:
    """The tokens a step may choose from: the whole vocabulary, or a closed one whose logits alone are computed."""

    def __init__(self, model: Any, suppress: Sequence[int], allowed: Sequence[int] | None, device: torch.device):
        self.model = model
        self.ids = torch.tensor(sorted(set(allowed)), dtype=torch.long, device=device) if allowed else None
        size = len(self.ids) if self.ids is not None else model.vocab_size
        banned = torch.zeros(size, dtype=torch.bool, device=device)
        for token in suppress:
            if self.ids is None:
                banned[token] = True
            else:
                banned |= self.ids == token
        self.banned = banned if bool(banned.any()) else None

    def logits(self, input_ids: Tensor, mask: Tensor, state: Any) -> Tensor:
        """Float next-token logits (b, candidates), banned ones at -inf."""
        if self.ids is None:
            logits = self.model.step(input_ids, mask, state)
        else:
            logits = self.model.step(input_ids, mask, state, token_ids=self.ids)
        logits = logits.float()
        return logits if self.banned is None else logits.masked_fill(self.banned, float("-inf"))

    def token(self, index: Tensor) -> Tensor:
        """Candidate positions -> token ids."""
        return index if self.ids is None else self.ids[index]


def sample_next(
    logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Samples one token per row from ``softmax(logits / temperature)`` restricted to the top-k and to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _budget(model: Any, prompt_len: int, max_new_tokens: int) -> int:
    context = getattr(model, "context_length", None)
    if context is None:
        return max_new_tokens
    if prompt_len >= context:
        raise ValueError(f"the prompt has {prompt_len} tokens; the decoder's context length is {context}")
    return min(max_new_tokens, context - prompt_len)


@torch.no_grad()
def generate(
    model: Generator,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_token_ids: Sequence[int] = (),
    allowed_token_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    **inputs: Any,
) -> Tensor:
    """Continues left-padded prompts; returns the new tokens (b, <= max_new_tokens), padded after each stop.

    Args:
        model: a model with the generation protocol (:class:`vlm.models.protocols.Generator`).
        input_ids: prompts (b, n), left-padded.
        attention_mask: (b, n), 0 on the padding; ``None`` if nothing is padded.
        max_new_tokens: most tokens to generate (fewer if the context would overflow).
        stop_token_ids: a row is finished once it emits one of these.
        pad_token_id: fills the rows that finished early.
        num_beams: beam search with this many beams (1: greedy or sampling).
        num_return_sequences: with beam search, the best this many hypotheses of each prompt, best first, as
            consecutive rows (b * num_return_sequences rows; at most ``num_beams``).
        length_penalty: beam scores are ``sum log p / length ** length_penalty`` (> 0 favours longer outputs).
        early_stopping: beam search stops a prompt once it holds ``num_beams`` finished hypotheses (HF's
            ``early_stopping=True``); ``False`` goes on while a live beam scores better than the worst of the best
            ``num_beams`` finished ones, so many beams do not end on short stubs that finished first.
        do_sample: sample instead of taking the most likely token.
        temperature, top_p, top_k: sampling parameters (see :func:`sample_next`).
        suppress_token_ids: never generated (e.g. ``<image>`` and padding).
        allowed_token_ids: if given, only these are generated (a closed vocabulary).
        use_cache: keep past keys/values; ``False`` recomputes the whole sequence at every step.
        generator: random generator for sampling.
        inputs: passed to ``model.start_generation`` (e.g. ``images``).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search with sampling is not supported: use num_beams=1 with do_sample")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams={num_beams}, "
                         f"got {num_return_sequences}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new_tokens = _budget(model, input_ids.shape[1], max_new_tokens)
    candidates = _Candidates(model, suppress_token_ids, allowed_token_ids, input_ids.device)
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=input_ids.device)
    state = model.start_generation(use_cache=use_cache, **inputs)
    run = dict(candidates=candidates, state=state, use_cache=use_cache, stops=stops, pad=pad_token_id)
    if num_beams == 1:
        return _sample_or_greedy(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
                                 generator, **run)
    return _beam_search(input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, num_return_sequences,
                        early_stopping, **run)


def _sample_or_greedy(ids, mask, max_new_tokens, do_sample, temperature, top_p, top_k, generator, *, candidates,
                      state, use_cache, stops, pad) -> Tensor:
    b = ids.shape[0]
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    out: list[Tensor] = []
    new = ids
    for _ in range(max_new_tokens):
        logits = candidates.logits(new if use_cache else ids, mask, state)  # (b, candidates)
        if do_sample:
            index = sample_next(logits, temperature, top_p, top_k, generator)
        else:
            index = logits.argmax(dim=-1)
        token = candidates.token(index).masked_fill(finished, pad)
        out.append(token)
        finished = finished | torch.isin(token, stops)
        if bool(finished.all()):
            break
        new = token[:, None]
        ids = torch.cat([ids, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    return torch.stack(out, dim=1) if out else ids.new_empty(b, 0)


def _beam_search(ids, mask, max_new_tokens, num_beams, length_penalty, num_return, early_stopping, *, candidates, state,
                 use_cache, stops, pad) -> Tensor:
    """Beam search; a sample is done once ``num_beams`` finished hypotheses exist (``early_stopping``) or, without
    it, once no live beam scores better than the worst of the best ``num_beams`` finished ones."""
    b, k = ids.shape[0], num_beams
    expand = torch.arange(b, device=ids.device).repeat_interleave(k)
    ids, mask = ids[expand], mask[expand]
    model = candidates.model
    model.reorder_state(state, expand)
    scores = torch.zeros(b, k, device=ids.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: only the first may expand at step 1
    scores = scores.view(-1)
    generated = ids.new_empty(b * k, 0)
    hyps: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
    done = [False] * b
    stop_set = set(stops.tolist())
    new = ids
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(candidates.logits(new if use_cache else ids, mask, state), dim=-1)  # (b*k, vocab)
        vocab = logprobs.shape[-1]
        cand = (scores[:, None] + logprobs).view(b, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=1)  # 2k: enough to refill k beams after k stops
        top_tokens = candidates.token(top_index % vocab).tolist()
        next_beam, next_token, next_score = [], [], []
        for i in range(b):
            chosen: list[tuple[int, int, float]] = []
            for rank in range(2 * k):
                beam, token = int(top_index[i, rank]) // vocab, top_tokens[i][rank]
                score = float(top_scores[i, rank])
                if done[i]:
                    break
                if token in stop_set:
                    if rank < k:  # a stop only counts if it is among the k best candidates
                        seq = torch.cat([generated[i * k + beam], generated.new_tensor([token])])
                        hyps[i].append((score / (step + 1) ** length_penalty, seq))
                    continue
                chosen.append((beam, token, score))
                if len(chosen) == k:
                    break
            if not done[i] and len(hyps[i]) >= k and not early_stopping and chosen:
                worst = sorted(score for score, _ in hyps[i])[-k]  # the k-th best finished
                done[i] = max(score for _, _, score in chosen) / (step + 1) ** length_penalty <= worst
            elif len(hyps[i]) >= k:
                done[i] = True
            if done[i]:
                chosen = [(j, pad, float("-inf")) for j in range(k)]
            while len(chosen) < k:  # only when the scores ran out (tiny vocabularies): repeat the last
                chosen.append(chosen[-1])
            for beam, token, score in chosen:
                next_beam.append(i * k + beam)
                next_token.append(token)
                next_score.append(score)
        if all(done):
            break
        index = torch.tensor(next_beam, device=ids.device)
        new = torch.tensor(next_token, device=ids.device)[:, None]
        scores = torch.tensor(next_score, device=ids.device)
        model.reorder_state(state, index)
        generated = torch.cat([generated[index], new], dim=1)
        ids = torch.cat([ids[index], new], dim=1)
        mask = torch.cat([mask[index], torch.ones_like(new)], dim=1)
    length = generated.shape[1]
    for i in range(b):
        if not done[i]:  # ran out of tokens: the live beams compete with the finished ones
            for j in range(k):
                if torch.isfinite(scores[i * k + j]):
                    hyps[i].append((float(scores[i * k + j]) / max(length, 1) ** length_penalty, generated[i * k + j]))
    best = []  # each prompt's num_return best, best first (ties: the hypothesis found first)
    for h in hyps:
        ranked = [seq for _, seq in sorted(h, key=lambda t: -t[0])][:num_return]
        best.extend(ranked + [ranked[-1] if ranked else generated.new_empty(0)] * (num_return - len(ranked)))
    width = max((len(s) for s in best), default=0)
    out = torch.full((len(best), width), pad, dtype=torch.long, device=ids.device)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = seq
    return out


def few_shot_prompt(captions: Sequence[str], prompt: str = "") -> str:
    """An in-context prompt: k solved examples, then the query image (Flamingo's few-shot format).

    ``few_shot_prompt(["a red circle", "a blue star"])`` ->
    ``"<image>a red circle<|endofchunk|><image>a blue star<|endofchunk|><image>"``; pass the k + 1 images in the
    same order, as (b, k + 1, 3, H, W).
    """
    def lead(text: str) -> str:
        return f"{prompt} {text}" if prompt else text

    shots = "".join(f"{IMAGE_TOKEN}{lead(c)}{END_OF_CHUNK_TOKEN}" for c in captions)
    return f"{shots}{IMAGE_TOKEN}{prompt}"


@dataclass
class Captioner:
    """A trained Flamingo with what captioning needs: its tokenizer, image statistics and decoding defaults."""

    model: nn.Module
    tokenizer: Any
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_new_tokens: int
    num_beams: int
    vocab_ids: list[int] | None  # decoding restricted to these ids (the task's ``vocabulary``), or None
    attribute_words: list[str]  # the words attribute accuracy compares

    @torch.no_grad()
    def generate_captions(
        self,
        images: Tensor,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Captions of a batch of images (greedy or beam search; defaults from the task's arguments).

        ``images`` is (b, 3, H, W), or (b, T, 3, H, W) with a ``prompt`` holding T ``<image>`` markers (few-shot);
        ``prompt`` may be a list, one per image; ``kwargs`` go to :func:`generate` (e.g. ``length_penalty``,
        ``do_sample``, ``top_p``).
        """
        return [self.tokenizer.decode(row) for row in
                self.generate_tokens(images, prompt, max_new_tokens, num_beams, **kwargs)]  # fmt: skip

    @torch.no_grad()
    def generate_tokens(
        self,
        images: Tensor,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **kwargs: Any,
    ) -> list[list[int]]:
        """The caption tokens of :meth:`generate_captions`, each row cut before its stop token (the one place a
        Flamingo generates: captions, answers, few-shot prompts and the task's validation all come here)."""
        if self.vocab_ids is not None:
            kwargs.setdefault("allowed_token_ids", self.vocab_ids)
        max_new_tokens, num_beams = max_new_tokens or self.max_new_tokens, num_beams or self.num_beams
        prompt = self.tokenizer.caption_prompt() if prompt is None else prompt
        prompts = [prompt] * images.shape[0] if isinstance(prompt, str) else list(prompt)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        num_images = images.shape[1] if images.ndim >= 5 else 1
        for text in set(prompts):
            if (found := self.tokenizer.count_images(text)) != num_images:
                raise ValueError(f"the prompt has {found} {IMAGE_TOKEN} marker(s) but {num_images} image(s) per "
                                 "sample")
        enc = self.tokenizer.encode_prompts(prompts)
        device = images.device
        tokens = generate(
            self.model,
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            images=images,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            stop_token_ids=[self.tokenizer.end_of_chunk_token_id, self.tokenizer.eos_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
            suppress_token_ids=[self.tokenizer.image_token_id, self.tokenizer.pad_token_id],
            **kwargs,
        )
        ends = {self.tokenizer.end_of_chunk_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        rows = []
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), len(row))
            rows.append(row[:cut])
        return rows

    @torch.no_grad()
    def generate_reranked(
        self,
        images: Tensor,
        score: Callable[[list[str]], Tensor],
        beams: int,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """One caption per image, chosen among its ``beams`` best beam-search captions by ``score``: given the
        distinct candidate texts, it returns (b, len(texts)) scores, higher better (e.g. a CLIP model's image-text
        similarity); a tie keeps the beam search's order."""
        kwargs.setdefault("early_stopping", False)  # else the beams fill with short stubs that finished first
        flat = self.generate_captions(images, prompt, max_new_tokens, beams, num_return_sequences=beams, **kwargs)
        texts = list(dict.fromkeys(flat))  # each distinct caption scored once
        index = {text: i for i, text in enumerate(texts)}
        scores = score(texts)
        out = []
        for i in range(images.shape[0]):
            candidates = flat[i * beams:(i + 1) * beams]  # best first
            columns = torch.tensor([index[t] for t in candidates], device=scores.device)
            out.append(candidates[int(scores[i, columns].argmax())])
        return out

    @torch.no_grad()
    def generate_answers(
        self,
        images: Tensor,
        questions: Sequence[str],
        shots: Sequence[Sequence[tuple[str, str]]] | None = None,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Short answers to one question per input (visual question answering; greedy unless ``kwargs`` say
        otherwise), each cut where a model would start another turn (:func:`vlm.vqa.first_answer`).

        ``images`` is (b, 3, H, W), or (b, k + 1, 3, H, W) with ``shots``: for each input, its k solved examples as
        ``(question, answer)`` pairs whose images come first, in order (few-shot; the inputs may have different
        examples, as retrieved examples do). The prompt is the task's ``question_prompt`` layout
        (:meth:`~vlm.data.gpt2_tokenizer.FlamingoTokenizer.few_shot_question_text`).
        """
        from vlm.vqa import first_answer

        shots = [()] * len(questions) if shots is None else shots
        if len(shots) != len(questions):
            raise ValueError(f"{len(shots)} example lists for {len(questions)} questions")
        prompts = [self.tokenizer.few_shot_question_text(q, s) for q, s in zip(questions, shots)]
        kwargs.setdefault("num_beams", 1)
        return [first_answer(a) for a in self.generate_captions(images, prompts, max_new_tokens, **kwargs)]


__all__ = ["Captioner", "few_shot_prompt", "generate", "sample_next"]
