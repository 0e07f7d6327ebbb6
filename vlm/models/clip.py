"""CLIP: contrastive language-image pre-training (Radford et al. 2021).

An image tower and a text tower each map their input to a vector; linear projections bring both to a shared
``embed_dim`` where matching pairs should have the highest cosine similarity. The softmax temperature is learned
as ``logit_scale = log(1 / T)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CLIP(nn.Module):
    """Two towers, two projections and a learned temperature.

    Args:
        vision: image tower mapping images (b, c, h, w) to (b, vision.width), e.g. a ``VisionTransformer``.
        text: text tower mapping token ids (b, n) to (b, text.width), e.g. a ``TextTransformer`` or an
            ``HFTextEncoder``.
        embed_dim: width of the shared embedding space.
        init_logit_scale: initial ``log(1/T)``; CLIP starts at T = 0.07.
        max_logit_scale: upper clamp of ``logit_scale`` (ln 100: logits never scaled by more than 100).
        init_logit_bias: initial learnable logit bias for the sigmoid (SigLIP) loss; ``None`` for no bias.
    """

    def __init__(
        self,
        vision: nn.Module,
        text: nn.Module,
        embed_dim: int = 512,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        self.vision_proj = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.vision_proj.weight, std=vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width**-0.5)
        # The temperature is learned in log space so it stays positive.
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Images (b, c, h, w) -> embeddings (b, embed_dim), unit length when ``normalize``."""
        x = self.vision_proj(self.vision(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        """Token ids (b, n) -> embeddings (b, embed_dim), unit length when ``normalize``."""
        x = self.text_proj(self.text(text))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the unit-length image and text embeddings, each (b, embed_dim)."""
        return self.encode_image(images), self.encode_text(text)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keeps ``exp(logit_scale)`` within [1, 100], as CLIP does after every optimizer step: an unbounded
        temperature makes training unstable."""
        self.logit_scale.clamp_(0, self.max_logit_scale)
