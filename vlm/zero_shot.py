"""Zero-shot classification with a CLIP model (Radford et al. 2021, section 3.1).

Each class name is written into several prompt templates ("a photo of a {}."); the text embeddings of a class are
averaged in embedding space and renormalised (prompt ensembling), giving one unit vector per class. The resulting
classifier is built once and reused for every image; an image's class probabilities are the softmax of its scaled
cosine similarities to the class vectors.

With ``pooling="marginal"`` the templates are not averaged: each is its own classifier, and a class's logit is the
log of the mean, over templates, of the exponentiated scaled cosine (:func:`class_logits`): the class's probability
summed over which template describes the image. That is the right reading when the templates are the training
captions' own frames ("a large {}", "a small {}"): a frame then says something about the image (its size), and
averaging "a large red triangle" with "a small red triangle" blurs the very differences between classes (measured in
docs/results.md, "Your own data").
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Template = str | Callable[[str], str]
POOLINGS = ("mean", "marginal")  # how a class's prompts combine: averaged embeddings, or a marginal over prompts

# Named template sets. "openai" is the 80-prompt ImageNet ensemble from the CLIP paper, taken from the
# open_clip package rather than copied here.
TEMPLATE_SETS = ("simple", "openai", "openai_simple", "shapes", "paraphrased")
# Prompts worded away from the synthetic training captions ("a [size] red circle [relation ...]"): they measure
# whether a text tower understands the class name or only the caption template it was trained on.
PARAPHRASED = (
    "a picture of a {}.",
    "there is a {} in this image",
    "an image containing one {}",
    "a {} on a plain background",
    "a simple drawing of a {}",
)


def get_templates(spec: str | Sequence[Template]) -> list[Template]:
    """Resolves template set names (``simple``, ``openai``, ``openai_simple``, ``shapes``, ``paraphrased``) and prompts.

    ``spec`` is a set name, a prompt with one ``{}``, a callable taking the class name, or a list of those (names
    in a list are expanded in place).
    """
    items = [spec] if isinstance(spec, str) or callable(spec) else list(spec)
    templates: list[Template] = []
    for item in items:
        templates.extend(_template_set(item) if isinstance(item, str) and item in TEMPLATE_SETS else [item])
    for t in templates:
        if isinstance(t, str):
            check_template(t)
    if not templates:
        raise ValueError("no prompt templates given")
    return templates


MAX_TEMPLATE_CHARS = 1000


def check_template(template: str) -> str:
    """Returns ``template`` if it is a prompt with exactly one plain ``{}`` (``{{`` / ``}}`` for literal braces).

    A named field (``{x}``), a second field, a conversion (``{!r}``) or a format spec (``{:>300000000}``, which
    would pad every prompt to hundreds of megabytes) is refused, as is a template of over 1,000 characters.

    Raises:
        ValueError: naming the template and what is wrong with it.
    """
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"template of {len(template):,} characters: at most {MAX_TEMPLATE_CHARS:,}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # unbalanced braces
        raise ValueError(f"template {template!r} is malformed: {e}") from None
    if not fields:
        raise ValueError(
            f"unknown template set {template!r}: expected one of {', '.join(TEMPLATE_SETS)}, "
            "or a prompt containing {}"
        )
    if fields != [("", "", None)]:
        raise ValueError(f"template {template!r} must hold exactly one plain {{}} (no names, conversions or format "
                         "specs; write {{ and }} for literal braces)")
    return template


def _template_set(name: str) -> list[Template]:
    if name == "simple":
        return ["a photo of a {}."]
    if name == "shapes":
        return ["a {}", "a small {}", "a large {}"]
    if name == "paraphrased":
        return list(PARAPHRASED)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES if name == "openai" else SIMPLE_IMAGENET_TEMPLATES)


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: Sequence[str], templates: str | Sequence[Template],
                     pooling: str = "mean") -> Tensor:
    """Returns the zero-shot classifier: (num_classes, embed_dim), one unit vector per class, or with
    ``pooling="marginal"`` (num_templates, num_classes, embed_dim), one per template and class (see
    :func:`class_logits`).

    Args:
        model: a CLIP-like model with ``encode_text(tokens, normalize=True)``.
        tokenizer: callable turning a list of strings into token ids.
        classnames: the class names, in output order.
        templates: a template set name or a list of templates (see :func:`get_templates`).
        pooling: ``mean`` (CLIP's prompt ensemble) or ``marginal``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    classnames = [c.strip() for c in classnames]
    if not classnames or any(not c for c in classnames):
        raise ValueError("class names must be a non-empty list of non-blank names")
    templates = get_templates(templates)
    prompts = [_fill(t, c) for c in classnames for t in templates]  # class-major order
    device = next(model.parameters()).device
    emb = model.encode_text(tokenizer(prompts).to(device), normalize=True)  # (c*t, d)
    emb = emb.view(len(classnames), len(templates), -1)
    if pooling == "marginal":
        return emb.transpose(0, 1).contiguous()  # (t, c, d)
    return F.normalize(emb.mean(dim=1), dim=-1)  # average the prompt ensemble per class: (c, d)


def class_logits(features: Tensor, classifier: Tensor, logit_scale: Tensor) -> Tensor:
    """Class logits (b, num_classes) of unit image features (b, d) under a classifier of :func:`build_classifier`:
    the scaled cosines, or for a per-template classifier (t, c, d), ``log(mean_t exp(scaled cosine))``."""
    scale = logit_scale.exp()
    if classifier.dim() == 2:
        return scale * features @ classifier.T
    per_template = scale * torch.einsum("bd,tcd->btc", features, classifier.to(features.dtype))
    return torch.logsumexp(per_template, dim=1) - math.log(classifier.shape[0])


def pooled_classifier(classifier: Tensor) -> Tensor:
    """One unit vector per class (c, d) of any classifier: a per-template one averaged (for attention maps, which
    need one direction per class)."""
    return classifier if classifier.dim() == 2 else F.normalize(classifier.mean(dim=0), dim=-1)


@torch.no_grad()
def classify(model, images: Tensor, classifier: Tensor) -> Tensor:
    """Class probabilities (b, num_classes) of ``images`` (b, c, h, w) under a classifier from
    :func:`build_classifier`."""
    features = model.encode_image(images, normalize=True)  # (b, d)
    return class_logits(features, classifier, model.logit_scale).softmax(dim=-1)


@dataclass
class ZeroShotModel:
    """A trained CLIP with what classifying images needs: its tokenizer, prompt templates and image statistics."""

    model: nn.Module
    tokenizer: Any
    templates: str | list[str]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    template_pooling: str = "mean"  # see build_classifier

    @property
    def image_size(self) -> int:
        return self.model.vision.image_size
