"""GPT-style decoder language model (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

Token and learned position embeddings feed pre-norm transformer blocks under a causal mask; a final LayerNorm and
an unembedding tied to the token embedding give next-token logits. This is the decoder Flamingo freezes: the
default pipeline pretrains it on text (stage 2), and real GPT-2 weights load into it through
:func:`convert_gpt2_state_dict` (GPT-2 uses the tanh approximation of GELU and LayerNorm epsilon 1e-5).

Incremental decoding keeps past keys and values in a :class:`~vlm.models.layers.KVCache`. Left-padded batches
are supported: ``attention_mask`` marks real tokens, positions count real tokens only, and a padding query
attends to itself so no softmax is taken over nothing.

Every decoder that Flamingo can freeze (this one and :class:`~vlm.models.hf_decoder.HFCausalLM`) is a
:class:`~vlm.models.protocols.CausalDecoder`: it fills in the embedding, hidden states, unembedding and cache, and
inherits ``forward`` and the generation protocol of :mod:`vlm.generation`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.models.layers import Block, KVCache
from vlm.models.protocols import CausalDecoder


def positions_from_mask(attention_mask: Tensor, n: int) -> Tensor:
    """Position ids (b, n) of the last ``n`` tokens given the key mask (b, total) of the whole sequence so far.

    Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -n:]


def padded_causal_mask(attention_mask: Tensor, n: int) -> Tensor:
    """Boolean (b, 1, n, total) mask for the last ``n`` queries over all ``total`` keys (True = may attend).

    Causal, minus padding keys; every query also sees itself, so a padding query never has an empty row (SDPA
    would return NaN there, and the NaN would leak through the values of later layers).
    """
    total = attention_mask.shape[1]
    q_pos = torch.arange(total - n, total, device=attention_mask.device)  # (n,)
    k_pos = torch.arange(total, device=attention_mask.device)  # (total,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (n, total)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (b, n, total)
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask.unsqueeze(1)


class DecoderLM(CausalDecoder):
    """Causal decoder-only transformer with tied input/output embeddings.

    Args:
        vocab_size: number of token ids (50257 for the GPT-2 BPE vocabulary).
        context_length: maximum sequence length (size of the position embedding).
        width: hidden size.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``width``.
        act: MLP activation (GPT-2: ``gelu_tanh``).
        norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
        dropout: dropout on embeddings, attention weights and residual branches (training only).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        context_length: int = 1024,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        act: str = "gelu_tanh",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.embed_dim = width  # width of the token embeddings and of the final hidden states
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Embedding(context_length, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps, attn_drop=dropout,
                  proj_drop=dropout)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """GPT-2's initialisation: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 depth)
        so the residual stream's variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / (2 * depth) ** 0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=0.02 / (2 * depth) ** 0.5)

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers in order (Flamingo inserts its cross-attention before some of them)."""
        return self.blocks

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    @staticmethod
    def reorder_cache(cache: KVCache, index: Tensor) -> None:
        cache.reorder(index)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids (b, n) -> token embeddings (b, n, width), without positions."""
        return self.token_embedding(input_ids)

    def forward_hidden(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Token embeddings (b, n, width) -> final hidden states (b, n, width), after the last LayerNorm.

        Args:
            inputs_embeds: token embeddings of the new tokens (from :meth:`embed_tokens`, or edited by a caller).
            attention_mask: (b, past + n), 1 for real tokens and 0 for padding, covering the cached tokens too;
                ``None`` when nothing is padded.
            position_ids: (b, n); by default counted from ``attention_mask`` (or from the cache length).
            cache: keys and values of earlier tokens; the new ones are appended.
        """
        b, n, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if past + n > self.context_length:
            raise ValueError(
                f"the sequence has {past + n} tokens, more than the decoder's context length {self.context_length}"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, n)
            else:
                position_ids = torch.arange(past, past + n, device=inputs_embeds.device).expand(b, n)
        x = self.drop(inputs_embeds + self.pos_embed(position_ids))  # (b, n, d)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = padded_causal_mask(attention_mask, n)  # (b, 1, n, past + n)
        # Not tied to training mode: a frozen decoder (eval mode) that gradients flow through saves memory too.
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for i, blk in enumerate(self.blocks):
            kw = dict(attn_mask=attn_mask, is_causal=attn_mask is None, cache=cache, layer_idx=i)
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kw)
            else:
                x = blk(x, **kw)
        return self.ln_final(x)

    @property
    def unembedding_weight(self) -> Tensor:
        """The output matrix (vocab_size, embed_dim): tied to the token embedding."""
        return self.token_embedding.weight

    def unembed(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """Hidden states (..., width) -> logits (..., vocab_size), or only those of ``token_ids`` (..., k)."""
        weight = self.token_embedding.weight
        return F.linear(hidden, weight if token_ids is None else weight[token_ids])


def convert_gpt2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Maps a Hugging Face GPT-2 state dict (``GPT2LMHeadModel`` or ``GPT2Model``) to :class:`DecoderLM` keys.

    GPT-2's ``Conv1D`` layers store weights as (in, out), the transpose of ``nn.Linear``; its fused ``c_attn`` is
    laid out [q | k | v] with heads contiguous inside each, exactly like :class:`~vlm.models.layers.Attention`'s
    ``qkv``. The tied ``lm_head.weight`` and the causal-mask buffers are dropped.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    out = {
        "token_embedding.weight": sd["wte.weight"],
        "pos_embed.weight": sd["wpe.weight"],
        "ln_final.weight": sd["ln_f.weight"],
        "ln_final.bias": sd["ln_f.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    names = {
        "ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    }
    for i in range(depth):
        for theirs, ours in names.items():
            weight, bias = sd[f"h.{i}.{theirs}.weight"], sd[f"h.{i}.{theirs}.bias"]
            is_conv1d = not theirs.startswith("ln_")
            out[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if is_conv1d else weight
            out[f"blocks.{i}.{ours}.bias"] = bias
    return out


__all__ = ["DecoderLM", "convert_gpt2_state_dict", "padded_causal_mask", "positions_from_mask"]
