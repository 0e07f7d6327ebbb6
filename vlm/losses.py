"""Training losses: the contrastive losses of CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023), the
compositional terms built from captions (attribute phrases as extra positives, captions tied to their phrases), and
the next-token cross-entropy of the language-model and Flamingo tasks. Pure functions of tensors, and the contrastive
task's loss as an object a config names (:class:`ContrastiveLoss`: ``loss: {class_path: vlm.losses.SigLipLoss}``).

A new contrastive loss is a subclass of :class:`ContrastiveLoss` in this module, named by a config: nothing else
changes. It may hold learnable scalars of its own (``nn.Parameter``): they are saved with the task, get their share
of the gradient under ``accumulate_micro_batches`` like the model's temperature, and train without weight decay.
Checkpoints may name any :class:`ContrastiveLoss` of this module (and nothing outside it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class ContrastiveLoss(nn.Module):
    """The contrastive task's loss over this rank's rows of the global (every rank's) similarity matrix.

    ``forward(image, text, all_image, all_text, logit_scale, logit_bias, offset, same)``: this rank's unit-length
    features (b, d), every rank's (B, d) with this rank's at ``offset``, the model's ``log(1/T)`` and bias (None when
    the model has none), and optionally ``same`` (b, B), True where two captions are identical (each such pair a
    positive). It returns a scalar whose average over ranks is the loss of the whole batch on one process.
    """

    needs_logit_bias = False  # the model must be built with init_logit_bias

    def forward(self, image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None, offset: int, same: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class ClipLoss(ContrastiveLoss):
    """CLIP's symmetric InfoNCE (:func:`clip_loss`)."""

    def forward(self, image, text, all_image, all_text, logit_scale, logit_bias, offset, same=None):
        return clip_loss(image, text, all_image, all_text, logit_scale, offset, same)


class SigLipLoss(ContrastiveLoss):
    """SigLIP's pairwise sigmoid loss (:func:`siglip_loss`); needs the model's ``logit_bias``."""

    needs_logit_bias = True

    def forward(self, image, text, all_image, all_text, logit_scale, logit_bias, offset, same=None):
        return siglip_loss(image, all_text, logit_scale, logit_bias, offset, same)


# The names the contrastive task's ``loss`` argument also takes, as in earlier configs and checkpoints.
LOSS_NAMES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def contrastive_loss(loss: ContrastiveLoss | str) -> ContrastiveLoss:
    """``loss`` as a :class:`ContrastiveLoss` object: one already built, or a name of :data:`LOSS_NAMES`."""
    if isinstance(loss, ContrastiveLoss):
        return loss
    if isinstance(loss, str) and loss in LOSS_NAMES:
        return LOSS_NAMES[loss]()
    raise ValueError(f"loss must be one of {sorted(LOSS_NAMES)} or a vlm.losses.ContrastiveLoss, got {loss!r}")


def attribute_loss(image: Tensor, phrases: Tensor, positives: Tensor, logit_scale: Tensor, norm: float) -> Tensor:
    """Multi-positive InfoNCE of this rank's images against the batch's attribute phrases ("a large teal",
    "a large triangle"): each image's target is spread evenly over its own phrases, the rest of the phrases are
    its negatives (see :func:`vlm.prompts.attribute_targets`).

    Args:
        image: this rank's image features (b, d), unit length.
        phrases: the global batch's attribute-phrase features (p, d), unit length, the same on every rank.
        positives: (b, p) bool, True where phrase j is one of image i's. Rows without any are left out.
        logit_scale: ``log(1/T)``, shared with the main loss.
        norm: what the sum over rows is divided by: the global batch's number of rows with a phrase, divided by the
            number of ranks (so that the ranks' losses average to the one-process loss, like the main loss's).
    """
    logits = logit_scale.exp() * image @ phrases.T  # (b, p)
    counts = positives.sum(dim=1, keepdim=True)
    targets = positives.to(logits.dtype) / counts.clamp(min=1)
    per_row = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)  # zero for rows without a phrase
    return per_row.sum() / max(norm, 1e-12)


def compose_loss(captions: Tensor, parts: Tensor, membership: Tensor) -> Tensor:
    """Ties each caption's embedding to the normalised sum of its attribute phrases' embeddings: the mean of
    ``1 - cos(caption, normalize(sum of its phrases))``.

    Args:
        captions: caption features (m, d), unit length.
        parts: attribute-phrase features (p, d), unit length.
        membership: (m, p) float, 1 where phrase j is a part of caption i.
    """
    target = F.normalize(membership @ parts, dim=-1)  # (m, d)
    return (1 - (captions * target).sum(dim=-1)).mean()


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


__all__ = ["LOSS_NAMES", "ClipLoss", "ContrastiveLoss", "SigLipLoss", "attribute_loss", "clip_loss", "compose_loss",
           "contrastive_loss", "next_token_loss", "siglip_loss"]
