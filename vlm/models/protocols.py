"""The two contracts the models keep, as code: what a decoder Flamingo can freeze offers (:class:`CausalDecoder`, a
base class), and what :func:`vlm.generation.generate` asks of a model (:class:`Generator`, a protocol).

A new decoder family is one subclass of :class:`CausalDecoder` that fills in its abstract members (embedding,
hidden states, unembedding, a KV cache); ``forward`` and the generation protocol come with the base, written once.
A config then names it as Flamingo's ``decoder`` (``class_path``), with nothing else to register.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Generator(Protocol):
    """What :func:`vlm.generation.generate` needs of a model.

    - ``start_generation(use_cache, **inputs) -> state``: one-off work before the first token (a decoder makes its
      cache; Flamingo also encodes and resamples the images, once);
    - ``step(input_ids, attention_mask, state, token_ids=None) -> logits (b, vocab)`` of the next token (only those of
      ``token_ids`` when given): with a cache ``input_ids`` are only the new tokens, without one the whole sequence;
      ``attention_mask`` always covers the whole sequence;
    - ``reorder_state(state, index)``: selects (or repeats) batch rows, for beam search;
    - ``vocab_size`` and ``context_length``.
    """

    vocab_size: int
    context_length: int

    def start_generation(self, *args: Any, use_cache: bool = True, **inputs: Any) -> Any: ...

    def step(self, input_ids: Tensor, attention_mask: Tensor | None, state: Any,
             token_ids: Tensor | None = None) -> Tensor: ...

    def reorder_state(self, state: Any, index: Tensor) -> None: ...


class CausalDecoder(nn.Module):
    """A causal language model Flamingo can freeze and insert cross-attention into.

    Subclasses set ``vocab_size``, ``width`` (of the layers), ``embed_dim`` (of the token embeddings and final hidden
    states) and ``context_length`` in their constructor, and implement :attr:`layers`, :meth:`embed_tokens`,
    :meth:`forward_hidden`, :meth:`unembed`, :attr:`unembedding_weight`, :meth:`new_cache` and
    :meth:`reorder_cache`. The rest is here: :meth:`forward` and the :class:`Generator` protocol, whose state is the
    KV cache (``None``: recompute the prefix at every step).
    """

    vocab_size: int
    width: int
    embed_dim: int
    context_length: int

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers in order (Flamingo inserts its cross-attention before some of them)."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids (b, n) -> token embeddings (b, n, embed_dim), without positions."""
        raise NotImplementedError

    def forward_hidden(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                       position_ids: Tensor | None = None, cache: Any | None = None) -> Tensor:
        """Token embeddings (b, n, embed_dim) -> final hidden states (b, n, embed_dim).

        ``attention_mask`` (b, past + n): 1 for real tokens, 0 for (left) padding, covering cached tokens too;
        ``position_ids`` (b, n), by default counted from the mask (or the cache length); ``cache``: the keys and
        values of earlier tokens (from :meth:`new_cache`), to which the new ones are appended.
        """
        raise NotImplementedError

    @property
    def unembedding_weight(self) -> Tensor:
        """The output matrix (vocab_size, embed_dim)."""
        raise NotImplementedError

    def unembed(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """Hidden states (..., embed_dim) -> logits (..., vocab_size), or only those of ``token_ids`` (..., k)."""
        raise NotImplementedError

    def new_cache(self) -> Any:
        """An empty KV cache for :meth:`forward_hidden`."""
        raise NotImplementedError

    @staticmethod
    def reorder_cache(cache: Any, index: Tensor) -> None:
        """Selects (or repeats) batch rows of ``cache`` in place."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Any | None = None) -> Tensor:
        """Token ids (b, n) -> next-token logits (b, n, vocab_size). Arguments as in :meth:`forward_hidden`."""
        return self.unembed(self.forward_hidden(self.embed_tokens(input_ids), attention_mask, position_ids, cache))

    # The Generator protocol: the state is the KV cache.
    def start_generation(self, use_cache: bool = True) -> Any | None:
        return self.new_cache() if use_cache else None

    @torch.no_grad()
    def step(self, input_ids: Tensor, attention_mask: Tensor | None, state: Any | None,
             token_ids: Tensor | None = None) -> Tensor:
        """Next-token logits (b, vocab), or (b, len(token_ids)), after the new tokens (with a cache) or the whole
        sequence (without)."""
        hidden = self.forward_hidden(self.embed_tokens(input_ids), attention_mask, cache=state)
        return self.unembed(hidden[:, -1], token_ids)  # only the last position is needed

    def reorder_state(self, state: Any | None, index: Tensor) -> None:
        if state is not None:
            self.reorder_cache(state, index)


__all__ = ["CausalDecoder", "Generator"]
