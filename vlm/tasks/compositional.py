"""The compositional terms of :class:`~vlm.tasks.contrastive.ContrastiveTask` (``attribute_positives``,
``compose_text``) and its ``templates: auto``: what each global batch's captions and labels give (see
:mod:`vlm.prompts`), encoded and turned into losses (:func:`vlm.losses.attribute_loss`,
:func:`vlm.losses.compose_loss`).

The strings of every rank are gathered, so every rank builds the same list of extra texts and encodes it in full;
only this rank's rows of the positives are kept. The terms are then exact under DDP and micro-batches like the rest
of the contrastive loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlm.data.sources import captions_and_labels
from vlm.losses import attribute_loss, compose_loss
from vlm.prompts import DEFAULT_TEMPLATES, attribute_targets, derive_templates, recombined_captions

log = logging.getLogger("vlm.tasks")

MAX_RECOMBINED = 256  # recombined captions per global batch: many label words per slot would otherwise multiply


class CompositionalTerms:
    """Mixed into the contrastive task, which sets ``attribute_positives``, ``compose_text``, ``model`` and
    ``tokenizer``."""

    attribute_positives: float
    compose_text: float
    templates: Any

    def resolved_templates(self) -> Any:
        """The templates to classify with: ``templates: auto`` before any data set it up is ``a {}``."""
        return list(DEFAULT_TEMPLATES) if self.templates == "auto" else self.templates

    def _derived_templates(self) -> list[str]:
        """``templates: auto``: the frames of the data module's training captions (else its validation captions)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        for name in ("train_dataset", "val_dataset"):
            pairs = _captions_and_labels(getattr(dm, name, None))
            if pairs is not None:
                templates = derive_templates(*pairs)
                log.info("zero-shot templates derived from the %s captions: %s", name.split("_")[0], templates)
                return templates
        log.info("templates: auto found no captions with labels: using %s", list(DEFAULT_TEMPLATES))
        return list(DEFAULT_TEMPLATES)


    @property
    def compositional(self) -> bool:
        return self.attribute_positives > 0 or self.compose_text > 0

    def compositional_plan(self, captions: Sequence[str] | None, labels: Sequence[str] | None,
                           b: int) -> Plan | None:
        """What the compositional terms need, from the global batch's captions and labels (None when both are off).

        Every rank gathers every rank's strings, so every rank builds the same phrase list: its features can then
        be computed in full on each rank, and only this rank's rows of the positives are kept.
        """
        if not self.compositional:
            return None
        if captions is None or labels is None:
            raise ValueError("attribute_positives / compose_text need the batch's 'caption' and 'label' strings")
        captions, labels = [str(c) for c in captions], [str(lbl) for lbl in labels]
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (captions, labels))
            captions = [c for part in gathered for c in part[0]]
            labels = [lbl for part in gathered for lbl in part[1]]
        phrases, positives = attribute_targets(captions, labels)
        texts, index = list(phrases), {p: j for j, p in enumerate(phrases)}
        recombined = recombined_captions(captions, labels, MAX_RECOMBINED) if self.compose_text > 0 else []
        for caption, parts in recombined:
            for t in (caption, *parts):
                if t not in index:
                    index[t] = len(texts)
                    texts.append(t)
        membership = torch.zeros(len(recombined), len(texts))
        for i, (_, parts) in enumerate(recombined):
            membership[i, [index[t] for t in parts]] = 1.0
        offset = (self.global_rank if self._trainer is not None else 0) * b
        return Plan(texts=texts, num_phrases=len(phrases), positives=positives[offset : offset + b],
                     norm=float(positives.any(dim=1).sum()) / world, membership=membership,
                     caption_index=[index[c] for c, _ in recombined])  # fmt: skip

    def _encode_extra(self, plan: Plan | None) -> Tensor | None:
        """The plan's texts, encoded with a graph (unit length), or None."""
        if plan is None or not plan.texts:
            return None
        return self.model.encode_text(self.tokenizer(plan.texts).to(self.model.logit_scale.device), normalize=True)

    def compositional_loss(self, image_features: Tensor, extra: Tensor | None, plan: Plan | None) -> Tensor | None:
        """The weighted compositional terms for this rank's images, or None when there are none."""
        if plan is None or extra is None:
            return None
        terms = []
        if self.attribute_positives > 0 and plan.num_phrases:
            positives = plan.positives.to(image_features.device)
            term = attribute_loss(image_features, extra[: plan.num_phrases], positives, self.model.logit_scale,
                                  plan.norm)  # fmt: skip
            terms.append(self.attribute_positives * term)
        if self.compose_text > 0 and plan.caption_index:
            membership = plan.membership.to(extra)
            terms.append(self.compose_text * compose_loss(extra[plan.caption_index], extra, membership))
        return sum(terms) if terms else None


@dataclass
class Plan:
    """The compositional terms' texts for one global batch (see :meth:`ContrastiveTask.compositional_plan`)."""

    texts: list[str]  # the attribute phrases first, then the recombined captions' texts not among them
    num_phrases: int
    positives: Tensor  # (b, num_phrases) bool: this rank's rows
    norm: float  # the global number of rows with a phrase, divided by the number of ranks
    membership: Tensor  # (m, len(texts)): 1 where text j is a phrase of recombined caption i
    caption_index: list[int]  # the recombined captions' positions in texts


def _captions_and_labels(dataset: Any) -> tuple[list[str], list[str]] | None:
    """A data set's captions and labels, or None if it has no labels."""
    pairs = captions_and_labels(dataset)
    return pairs if pairs is not None and any(pairs[1]) else None


__all__ = ["MAX_RECOMBINED", "CompositionalTerms", "Plan"]
