"""Training losses: the contrastive losses of CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023), and the
next-token cross-entropy of the language-model and Flamingo tasks. Pure functions of tensors; the tasks call them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.data.gpt2_tokenizer import IGNORE_INDEX


def clip_loss(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, logit_scale: Tensor, offset: int,
              same: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over this rank's rows of the global similarity matrix.

    Args:
        image: this rank's image features (b, d), unit length.
        text: this rank's text features (b, d), unit length.
        all_image: every rank's image features (B, d), this rank's included at ``offset``.
        all_text: every rank's text features (B, d).
        logit_scale: ``log(1/T)``.
        offset: index of this rank's first sample in the global batch.
        same: optional (b, B) bool, True where this rank's caption i equals the global caption j: every such pair is
            a positive, the target spread evenly over them (see ``ContrastiveTask(same_caption_positive)``).
    """
    scale = logit_scale.exp()
    logits_per_image = scale * image @ all_text.T  # (b, B)
    logits_per_text = scale * text @ all_image.T  # (b, B)
    if same is not None:  # identical captions: image i's positives are texts j, text i's are images j (symmetric)
        targets = same.float() / same.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
    labels = torch.arange(image.shape[0], device=image.device) + offset  # the matching pair sits on the diagonal
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image: Tensor, all_text: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int,
                same: Tensor | None = None) -> Tensor:
    """Pairwise sigmoid loss: every (image, text) pair is an independent binary classification (SigLIP).

    Normalised by the local batch size as in the paper, so the per-rank losses average to the global one. ``same``
    (as for :func:`clip_loss`) makes every pair with identical captions a positive.
    """
    logits = logit_scale.exp() * image @ all_text.T + logit_bias  # (b, B)
    if same is not None:
        labels = same.to(logits.dtype) * 2 - 1
    else:
        labels = -torch.ones_like(logits)
        labels[torch.arange(image.shape[0]), torch.arange(image.shape[0]) + offset] = 1.0  # +1 on the pairs
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def next_token_loss(
    hidden: Tensor, labels: Tensor, unembed: Callable[..., Tensor], token_ids: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` from ``hidden[:, t]``.

    Logits are computed only where a label counts, and, with ``token_ids`` (a closed vocabulary), only for those
    tokens: the unembedding is most of the cost of a small model with a large vocabulary.
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    h, target = hidden[:, :-1][keep], target[keep]  # (k, d), (k,)
    if token_ids is None:
        return F.cross_entropy(unembed(h).float(), target)
    index = torch.searchsorted(token_ids, target).clamp(max=len(token_ids) - 1)
    if not bool((token_ids[index] == target).all()):
        outside = target[token_ids[index] != target][0].item()
        raise ValueError(f"token id {outside} of a training text is not in the task's vocabulary")
    return F.cross_entropy(unembed(h, token_ids).float(), index)


__all__ = ["clip_loss", "next_token_loss", "siglip_loss"]
