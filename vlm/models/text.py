"""Causal text transformer: CLIP's text tower (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

Token and learned position embeddings feed pre-norm blocks under a causal mask; after the final LayerNorm the
sequence is pooled at the end-of-text token, the only position whose causal view covers the whole caption.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from vlm.models.layers import Block, checkpoint_blocks, init_weights_trunc_normal


class TextTransformer(nn.Module):
    """Causal transformer over token ids, pooled at the end-of-text token.

    Args:
        vocab_size: number of token ids (49408 for the CLIP BPE vocabulary).
        context_length: maximum sequence length (size of the position embedding).
        width: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``width``.
        act: MLP activation (OpenAI CLIP uses ``quick_gelu``; open_clip's own models ``gelu``).
        norm_eps: LayerNorm epsilon.
        eot_token_id: id of the end-of-text token, where the sequence is pooled.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        layer_scale: initial LayerScale value, or ``None`` (open_clip's ``ls_init_value``).
        pool: ``eot`` (CLIP: the end-of-text state) or ``mean`` (the mean of the states up to and including
            end-of-text, padding excluded: closer to a bag of words, so embeddings of new word combinations
            compose from the words').
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        eot_token_id: int = 49407,
        grad_checkpointing: bool = False,
        layer_scale: float | None = None,
        pool: Literal["eot", "mean"] = "eot",
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.eot_token_id = eot_token_id
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool must be 'eot' or 'mean', got {pool!r}")
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList(
            Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps,
                  layer_scale=layer_scale)
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.blocks.apply(init_weights_trunc_normal)

    def forward_tokens(self, text: Tensor) -> Tensor:
        """Token ids (b, n) -> normalised hidden states (b, n, width)."""
        n = text.shape[1]
        if n > self.context_length:
            raise ValueError(f"text has {n} tokens, more than the context length {self.context_length}")
        x = self.token_embedding(text) + self.pos_embed[:n]  # (b, n, d)
        x = checkpoint_blocks(self.blocks, x, self.grad_checkpointing, is_causal=True)
        return self.ln_final(x)

    def eot_positions(self, text: Tensor) -> Tensor:
        """Index of the first end-of-text token of each row (the last position if a row has none)."""
        is_eot = text == self.eot_token_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, text.shape[1] - 1))

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (b, n) -> the pooled text embedding (b, width)."""
        eot = self.eot_positions(text)
        if text.shape[0] > 0 and not torch.compiler.is_compiling():  # compiled graphs keep static shapes
            # Attention is causal, so the positions after every row's end-of-text (the padding) cannot change
            # what is pooled: they are cut off rather than computed (a caption fills ~20 of CLIP's 77 positions).
            text = text[:, : int(eot.max()) + 1]
        x = self.forward_tokens(text)
        if self.pool == "mean":
            keep = torch.arange(x.shape[1], device=x.device)[None, :] <= eot[:, None]  # (b, n): up to EOT
            return (x * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
        return x[torch.arange(x.shape[0], device=x.device), eot]
