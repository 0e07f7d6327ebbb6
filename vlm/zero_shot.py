"""Zero-shot classification with a CLIP model (Radford et al. 2021, section 3.1).

Each class name is written into several prompt templates ("a photo of a {}."); the text embeddings of a class are
averaged in embedding space and renormalised (prompt ensembling), giving one unit vector per class. The resulting
classifier is built once and reused for every image; an image's class probabilities are the softmax of its scaled
cosine similarities to the class vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Template = str | Callable[[str], str]

# Named template sets. "openai" is the 80-prompt ImageNet ensemble from the CLIP paper, taken from the
# open_clip package rather than copied here.
TEMPLATE_SETS = ("simple", "openai", "openai_simple", "shapes")


def get_templates(spec: str | Sequence[Template]) -> list[Template]:
    """Resolves a template set name (``simple``, ``openai``, ``openai_simple``, ``shapes``) or passes a list through.

    A template is a string with one ``{}`` or a callable taking the class name.
    """
    if not isinstance(spec, str):
        templates = list(spec)
    elif spec == "simple":
        templates = ["a photo of a {}."]
    elif spec == "shapes":
        templates = ["a {}", "a small {}", "a large {}"]
    elif spec in ("openai", "openai_simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        templates = list(OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)
    elif "{}" in spec:
        templates = [spec]
    else:
        raise ValueError(f"unknown template set {spec!r}: expected one of {', '.join(TEMPLATE_SETS)}, or a '{{}}' prompt")
    if not templates:
        raise ValueError("no prompt templates given")
    return templates


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: Sequence[str], templates: str | Sequence[Template]) -> Tensor:
    """Returns the zero-shot classifier (num_classes, embed_dim): one unit vector per class.

    Args:
        model: a CLIP-like model with ``encode_text(tokens, normalize=True)``.
        tokenizer: callable turning a list of strings into token ids.
        classnames: the class names, in output order.
        templates: a template set name or a list of templates (see :func:`get_templates`).
    """
    classnames = [c.strip() for c in classnames]
    if not classnames or any(not c for c in classnames):
        raise ValueError("class names must be a non-empty list of non-blank names")
    templates = get_templates(templates)
    prompts = [_fill(t, c) for c in classnames for t in templates]  # class-major order
    device = next(model.parameters()).device
    emb = model.encode_text(tokenizer(prompts).to(device), normalize=True)  # (c*t, d)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # average the prompt ensemble per class
    return F.normalize(emb, dim=-1)  # (c, d)


@torch.no_grad()
def classify(model, images: Tensor, classifier: Tensor) -> Tensor:
    """Class probabilities (b, num_classes) of ``images`` (b, c, h, w) under a classifier from
    :func:`build_classifier`."""
    features = model.encode_image(images, normalize=True)  # (b, d)
    logits = model.logit_scale.exp() * features @ classifier.T
    return logits.softmax(dim=-1)
