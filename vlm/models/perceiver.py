"""Perceiver Resampler (Alayrac et al. 2022, "Flamingo", section 2.1; after Jaegle et al. 2021, "Perceiver").

A fixed set of learned latent queries cross-attends to the visual tokens of one image (or of all frames of one
video) and returns exactly ``num_latents`` tokens, however many patches or frames came in. That keeps the cost of
the language model's cross-attention independent of the image resolution and the clip length.

Two details from the paper:

- the keys and values are the concatenation of the visual tokens **and the latents themselves**, so latents can
  also exchange information with each other;
- a learned time embedding is added per frame before frames are flattened together, so the latents can tell
  frames apart (attention by itself is order-blind). Single images are one-frame videos. Separate images of an
  interleaved sequence are resampled independently; which one a text token sees is decided by the media mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlm.models.layers import MLP, Attention


class PerceiverLayer(nn.Module):
    """Latents attend to ``concat(media, latents)``, then a feed-forward; both residual, pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_latents = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, context_dim=dim, qkv_bias=False, proj_bias=False)
        self.norm_mlp = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act="gelu", bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media (B, n, d), latents (B, L, d) -> latents (B, L, d)."""
        q = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), q], dim=1)  # (B, n + L, d): media and latents
        latents = latents + self.attn(q, context=context)
        return latents + self.mlp(self.norm_mlp(latents))


class PerceiverResampler(nn.Module):
    """Maps the visual tokens of each media item to ``num_latents`` tokens.

    Args:
        dim: width of the visual tokens (and of the output).
        depth: number of perceiver layers.
        num_heads: attention heads.
        num_latents: number of output tokens per media item (Flamingo: 64).
        max_frames: number of time embeddings, i.e. the most frames per media item.
        mlp_ratio: feed-forward hidden width relative to ``dim``.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 6,
        num_heads: int = 8,
        num_latents: int = 64,
        max_frames: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_latents = num_latents
        self.max_frames = max_frames
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.time_embedding = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor) -> Tensor:
        """Visual tokens (b, T, F, n, d) of T media items with F frames each -> latents (b, T, num_latents, d)."""
        b, t, f, n, d = media.shape
        if f > self.max_frames:
            raise ValueError(f"{f} frames per media item, but the resampler has only {self.max_frames} time embeddings")
        media = media + self.time_embedding[:f, None, :]  # (F, 1, d): one embedding per frame
        media = media.reshape(b * t, f * n, d)  # every media item on its own; its frames side by side
        latents = self.latents.expand(b * t, -1, -1)  # (b*T, L, d)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents).view(b, t, self.num_latents, d)


__all__ = ["PerceiverLayer", "PerceiverResampler"]
