"""``vlm.load``: a trained model, ready to use, with its preprocessing inside.

    import vlm
    clip = vlm.load("runs/clip-scenes/checkpoints/last.ckpt")
    clip.classify("photo.png", ["red circle", "blue square"])       # [[("red circle", 0.93), ("blue square", 0.07)]]
    vlm.load("runs/flamingo/checkpoints/last.ckpt").caption("photo.png")   # ["a small red circle"]

``source`` is a ``vlm fit`` checkpoint, a ``vlm export`` folder, ``open_clip:<arch>`` or ``timm:<name>`` with a local
weights file (converted by :mod:`vlm.interop`). What comes back is a :class:`CLIPPredictor` (classify, embed,
similarity), a :class:`CaptionPredictor` (caption) or, for a timm ViT, a :class:`VisionPredictor` (embed images).
``images`` are paths, PIL images, numpy arrays (H, W, C) or tensors (C, H, W), one or a list (a 4-d array or
tensor is a batch); they are batched internally. Files go through the checks of :mod:`vlm.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vlm.data.images import as_pil, as_pil_list, image_items
from vlm.data.transforms import eval_transform
from vlm.explain import Explanation, caption_maps, clip_maps
from vlm.formats import CheckpointError, load_model
from vlm.generation import Captioner, few_shot_prompt
from vlm.zero_shot import ZeroShotModel, build_classifier, class_logits, get_templates, pooled_classifier

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
Images = ImageInput | Sequence[ImageInput]
Examples = Sequence[tuple[ImageInput, str]] | None
QuestionExamples = Sequence[tuple[ImageInput, str, str]] | None  # (image, question, answer)


class Predictor:
    """What every loaded model answers; a method its kind of model cannot serve raises one clear ``TypeError``."""

    kind = "model"
    can = ""

    def __init__(self, source: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        self.source = source
        self.image_size = image_size
        self.image_mean, self.image_std = tuple(mean), tuple(std)
        self.transform = eval_transform(image_size, mean, std)
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _cannot(self, what: str) -> TypeError:
        return TypeError(f"{self.source} is a {self.kind}: it {self.can}; {what}")

    def classify(self, images: Images, labels: Sequence[str], templates: Any = None, top_k: int = 5):
        raise self._cannot("zero-shot classification needs a CLIP checkpoint")

    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        raise self._cannot("text embeddings need a CLIP checkpoint")

    def similarity(self, images: Images, texts: str | Sequence[str]) -> Tensor:
        raise self._cannot("image-text similarity needs a CLIP checkpoint")

    def embed_images(self, images: Images) -> Tensor:
        raise self._cannot("image embeddings need a CLIP or a ViT")

    def caption(self, images: Images, prompt: str | None = None, examples: Any = None, **kwargs: Any) -> list[str]:
        raise self._cannot("captioning needs a Flamingo checkpoint")

    def answer(self, images: Images, questions: str | Sequence[str], examples: Any = None,
               **kwargs: Any) -> list[str]:
        raise self._cannot("answering questions needs a Flamingo checkpoint")

    def explain(self, images: Images, labels: Sequence[str] | None = None, **kwargs: Any) -> list[Explanation]:
        raise self._cannot("attention maps need a CLIP or a Flamingo checkpoint")

    # ------------------------------------------------------------------------------------------------ images
    def preprocess(self, images: Images) -> Tensor:
        """The images as one normalised batch (n, 3, image_size, image_size) on the model's device."""
        return torch.stack([self.transform(as_pil(item)) for item in image_items(images)]).to(self.device)

    def _batches(self, images: Images) -> Iterator[Tensor]:
        items = image_items(images)
        for start in range(0, len(items), self.batch_size):
            # each image is decoded and turned into its model tensor before the next is decoded: a batch never
            # holds several decoded full-size images
            yield torch.stack([self.transform(as_pil(item))
                               for item in items[start:start + self.batch_size]]).to(self.device)  # fmt: skip


def _texts(texts: str | Sequence[str]) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or not all(isinstance(t, str) for t in items):
        raise ValueError("texts must be a string or a non-empty list of strings")
    return items


class CLIPPredictor(Predictor):
    """A CLIP model with its tokenizer, prompt templates and image preprocessing."""

    kind = "CLIP model"
    can = "classifies, embeds images and texts and scores their similarity"

    def __init__(self, loaded: ZeroShotModel, source: str, **kwargs: Any) -> None:
        super().__init__(source, loaded.image_size, loaded.image_mean, loaded.image_std, **kwargs)
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer = loaded.tokenizer
        self.templates = loaded.templates
        self.template_pooling = loaded.template_pooling
        self._classifiers: dict[tuple, Tensor] = {}

    @torch.no_grad()
    def embed_images(self, images: Images) -> Tensor:
        """Unit-length image embeddings (n, embed_dim)."""
        return torch.cat([self.model.encode_image(batch, normalize=True) for batch in self._batches(images)])

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Unit-length text embeddings (n, embed_dim)."""
        tokens = self.tokenizer(_texts(texts)).to(self.device)
        return torch.cat([self.model.encode_text(chunk, normalize=True) for chunk in tokens.split(self.batch_size)])

    def similarity(self, images: Images, texts: str | Sequence[str]) -> Tensor:
        """Cosine similarity of every image with every text (n_images, n_texts)."""
        return self.embed_images(images) @ self.embed_texts(texts).T

    def zero_shot_classifier(self, labels: Sequence[str], templates: Any = None, pooling: str | None = None) -> Tensor:
        """The class vectors (num_labels, embed_dim) for ``labels`` under ``templates`` (default: the model's),
        built once per label set and kept; (num_templates, num_labels, embed_dim) when marginalising over the
        templates (``pooling``, default the model's ``template_pooling``: see :func:`vlm.zero_shot.build_classifier`).

        Raises:
            ValueError: a blank label or a template without exactly one plain ``{}``.
        """
        templates = self.templates if templates is None else templates
        pooling = self.template_pooling if pooling is None else pooling
        key = (tuple(labels), tuple(get_templates(templates)), pooling)
        if key not in self._classifiers:
            self._classifiers[key] = build_classifier(self.model, self.tokenizer, list(labels), templates, pooling)
        return self._classifiers[key]

    @torch.no_grad()
    def classify(self, images: Images, labels: Sequence[str], templates: Any = None,
                 top_k: int = 5, pooling: str | None = None) -> list[list[tuple[str, float]]]:
        """Zero-shot classification: for each image, the ``top_k`` most probable labels, best first.

        Args:
            images: one image or many (see the module docstring).
            labels: the class names.
            templates: prompt templates (a set name such as ``"openai"``, or prompts with one ``{}``); default: the
                ones the model was validated with.
            top_k: labels per image (at most ``len(labels)``).
            pooling: how a label's prompts combine, ``mean`` or ``marginal``; default: the model's.
        """
        labels = [labels] if isinstance(labels, str) else list(labels)
        classifier = self.zero_shot_classifier(labels, templates, pooling)
        k = max(1, min(top_k, len(labels)))
        out = []
        for batch in self._batches(images):
            features = self.model.encode_image(batch, normalize=True)
            probs = class_logits(features, classifier, self.model.logit_scale).softmax(dim=-1)
            top = probs.topk(k, dim=1)
            out.extend([(labels[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
                       for vals, idx in zip(top.values, top.indices))  # fmt: skip
        return out


    def explain(self, images: Images, labels: Sequence[str] | None = None, templates: Any = None,
                method: str = "relevance") -> list[Explanation]:
        """Where the model looks, per image: attention rollout, class-token attention and one map per label
        (``method``: ``relevance``, gradient-weighted attention, or ``similarity``, patch-text cosine); see
        :mod:`vlm.explain.maps`. The labels' vectors are built as for :meth:`classify`."""
        if not labels:
            raise ValueError("explain needs at least one label for a CLIP model")
        labels = [labels] if isinstance(labels, str) else list(labels)
        classifier = pooled_classifier(self.zero_shot_classifier(labels, templates))
        return [exp for batch in self._batches(images)
                for exp in clip_maps(self.model, batch, classifier, labels, method)]


class CaptionPredictor(Predictor):
    """A Flamingo model with its tokenizer, decoding defaults and image preprocessing."""

    kind = "Flamingo model"
    can = "captions images and answers questions about them"

    def __init__(self, loaded: Captioner, source: str, **kwargs: Any) -> None:
        super().__init__(source, loaded.image_size, loaded.image_mean, loaded.image_std, **kwargs)
        loaded.model.to(self.device).eval()
        self.captioner = loaded
        self.reranker: CLIPPredictor | None = None
        self.rerank_beams = 0

    def rerank_with(self, clip: CLIPPredictor | None, beams: int = 8) -> CaptionPredictor:
        """Captions are then chosen by ``clip`` among the ``beams`` best of a beam search (at least ``num_beams``):
        the captioner proposes the wording, a CLIP that composes attributes (the own-data CLIP stage) picks "a teal
        square" where a captioner that never saw one prefers "a teal triangle". ``None``: off. :meth:`answer` and
        :meth:`explain` are not reranked. Returns this predictor."""
        if clip is not None and not isinstance(clip, CLIPPredictor):
            kind = getattr(clip, "kind", type(clip).__name__)
            raise TypeError(f"captions are reranked by a CLIP model, not a {kind}")
        if not 1 <= beams <= 64:
            raise ValueError(f"beams must be between 1 and 64, got {beams}")
        self.reranker, self.rerank_beams = clip, beams
        return self

    @property
    def model(self) -> nn.Module:
        return self.captioner.model

    def caption(self, images: Images, prompt: str | None = None, examples: Examples = None,
                max_new_tokens: int | None = None, num_beams: int | None = None,
                **sampling: Any) -> list[str]:
        """One caption per image.

        Args:
            images: one image or many.
            prompt: text after the image before the caption (e.g. ``"A photo of"``), or a whole prompt with one
                ``<image>`` marker per image (the examples' and the input's).
            examples: ``(image, caption)`` pairs shown before each input (few-shot in-context learning).
            max_new_tokens: caption length limit (default: the model's).
            num_beams: beam search width (default: the model's; 1 is greedy).
            sampling: passed to :func:`vlm.generation.generate` (``do_sample``, ``temperature``, ``top_p``, ``top_k``,
                ``length_penalty``, ``generator``).
        """
        examples = list(examples or [])
        shots = self.preprocess([image for image, _ in examples]) if examples else None
        full = self.build_prompt(prompt, [text for _, text in examples])
        if self.reranker is not None and sampling.get("do_sample"):
            raise ValueError("reranked captions come from beam search: do_sample does not apply (rerank_with(None))")
        out: list[str] = []
        for batch, clip_batch in self._caption_batches(images):
            if shots is not None:  # (b, k + 1, 3, H, W): the examples, then the input
                batch = torch.cat([shots.unsqueeze(0).expand(batch.shape[0], *shots.shape), batch.unsqueeze(1)], 1)
            if clip_batch is None:
                out.extend(self.captioner.generate_captions(batch, full, max_new_tokens, num_beams, **sampling))
            else:
                out.extend(self._reranked(batch, clip_batch, full, max_new_tokens, num_beams, sampling))
        return out

    def _caption_batches(self, images: Images) -> Iterator[tuple[Tensor, Tensor | None]]:
        if self.reranker is None:  # else each image also as the reranker's input (decoded once)
            yield from ((batch, None) for batch in self._batches(images))
            return
        items, to_clip = image_items(images), self.reranker.transform
        for start in range(0, len(items), self.batch_size):
            pairs = [(self.transform(im), to_clip(im)) for im in map(as_pil, items[start:start + self.batch_size])]
            yield tuple(torch.stack(column).to(self.device) for column in zip(*pairs))

    @torch.no_grad()
    def _reranked(self, batch: Tensor, clip_batch: Tensor, prompt: str, max_new_tokens: int | None,
                  num_beams: int | None, decoding: dict[str, Any]) -> list[str]:
        image_embeddings = self.reranker.model.encode_image(clip_batch, normalize=True)
        return self.captioner.generate_reranked(
            batch, lambda texts: image_embeddings @ self.reranker.embed_texts(texts).T,
            max(num_beams or self.captioner.num_beams, self.rerank_beams), prompt, max_new_tokens, **decoding)

    def answer(self, images: Images, questions: str | Sequence[str], examples: QuestionExamples = None,
               max_new_tokens: int | None = None, **decoding: Any) -> list[str]:
        """A short answer to a question about each image (visual question answering).

        Args:
            images: one image or many.
            questions: one question asked of every image, or one per image.
            examples: ``(image, question, answer)`` triples shown, solved, before each input (few-shot).
            max_new_tokens: answer length limit (default: the model's caption limit).
            decoding: passed to :func:`vlm.generation.generate` (greedy by default; ``num_beams``, ``do_sample``...).

        The prompt is the model's ``question_prompt`` (default ``<image>Question: {question} Short answer:``), the
        layout it trained on.

        Raises:
            ValueError: a number of questions that is neither one nor the number of images, an example that is not
                an (image, question, answer) triple, or a prompt longer than the decoder's context.
        """
        items = image_items(images)
        asked = [questions] * len(items) if isinstance(questions, str) else list(questions)
        if len(asked) != len(items) or not all(isinstance(q, str) for q in asked):
            raise ValueError(f"{len(asked)} questions for {len(items)} images: give one question, or one per image")
        examples = list(examples or [])
        if not all(isinstance(e, (tuple, list)) and len(e) == 3 for e in examples):
            raise ValueError("each example is an (image, question, answer) triple")
        pairs = [(str(q), str(a)) for _, q, a in examples]
        shots = self.preprocess([image for image, _, _ in examples]) if examples else None
        tokenizer, context = self.captioner.tokenizer, self.model.context_length
        for question in dict.fromkeys(asked):
            length = tokenizer.encode_prompts([tokenizer.few_shot_question_text(question, pairs)])["input_ids"].shape[1]
            if length >= context:
                raise ValueError(f"the question prompt is {length} tokens long, the decoder's context is {context} "
                                 "tokens")
        out: list[str] = []
        for start, batch in zip(range(0, len(items), self.batch_size), self._batches(items)):
            if shots is not None:  # (b, k + 1, 3, H, W): the examples, then the input
                batch = torch.cat([shots.unsqueeze(0).expand(batch.shape[0], *shots.shape), batch.unsqueeze(1)], 1)
            rows = asked[start:start + batch.shape[0]]
            out.extend(self.captioner.generate_answers(batch, rows, [pairs] * len(rows), max_new_tokens, **decoding))
        return out

    def explain(self, images: Images, labels: Sequence[str] | None = None, prompt: str | None = None,
                **decoding: Any) -> list[Explanation]:
        """Each image's caption with one map per caption token: where the gated cross-attention looked (through
        the resampler's latents, back to the image patches) when that token was predicted. ``decoding`` as for
        :meth:`caption`; ``labels`` is not used (a captioner explains its own words)."""
        full = self.build_prompt(prompt)
        out: list[Explanation] = []
        for batch in self._batches(images):
            ids = self.captioner.generate_tokens(batch, full, **decoding)
            texts = [self.captioner.tokenizer.decode(row) for row in ids]
            out.extend(caption_maps(self.captioner, batch, ids, full, texts))
        return out

    def build_prompt(self, prompt: str | None = None, example_captions: Sequence[str] = ()) -> str:
        """The generation prompt for one input after ``example_captions``' images.

        ``prompt`` without ``<image>`` is the text after each image (default: the model's training prompt); with
        ``<image>`` markers it is used as written and needs one per image (the examples' and the input's).

        Raises:
            ValueError: markers that do not fit the images, or a prompt longer than the decoder's context.
        """
        from vlm.data.gpt2_tokenizer import IMAGE_TOKEN

        tokenizer, images = self.captioner.tokenizer, len(example_captions) + 1
        if prompt is not None and IMAGE_TOKEN in prompt:
            if prompt.count(IMAGE_TOKEN) != images:
                raise ValueError(f"the prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} marker(s) but there are "
                                 f"{images} image(s) per input ({images - 1} example(s) + the input image)")
            full = prompt
        else:  # the training layout: each image, then the prompt, then its caption
            full = few_shot_prompt(list(example_captions), tokenizer.prompt if prompt is None else prompt)
        length, context = tokenizer.encode_prompts([full])["input_ids"].shape[1], self.model.context_length
        if length >= context:
            raise ValueError(f"the prompt is {length} tokens long, the decoder's context is {context} tokens")
        return full


class VisionPredictor(Predictor):
    """An image tower alone (a converted timm ViT): image embeddings only."""

    kind = "vision model"
    can = "embeds images"

    def __init__(self, model: nn.Module, source: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 **kwargs: Any) -> None:
        super().__init__(source, image_size, mean, std, **kwargs)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed_images(self, images: Images) -> Tensor:
        """Unit-length pooled image features (n, width)."""
        return torch.cat([F.normalize(self.model(batch), dim=-1) for batch in self._batches(images)])


def load(source: str | os.PathLike, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         batch_size: int = 32) -> Predictor:
    """A trained model with its preprocessing, ready to classify, embed or caption.

    Args:
        source: a ``vlm fit`` checkpoint (``.ckpt``), a ``vlm export`` folder, ``"open_clip:<arch>"`` (e.g.
            ``"open_clip:ViT-B-32-quickgelu"``) or ``"timm:<name>"`` (e.g. ``"timm:vit_base_patch16_224"``).
        weights: the local weights file of an ``open_clip:`` or ``timm:`` source (nothing is downloaded).
        device: where the model runs.
        batch_size: images per forward pass.

    Raises:
        vlm.formats.CheckpointError: a missing, refused or unreadable file, or a kind of checkpoint that has no
            inference use (e.g. a language-model checkpoint).
        ValueError: ``VLM_CPU_LINEAR`` names no CPU kernel backend (``auto``, ``onednn``, ``blas``, ``off``).
    """
    text = os.fspath(source)
    if text.startswith(("open_clip:", "timm:")):
        if weights is None:
            raise CheckpointError(f"{text}: give the local weights file (weights=...); vlm downloads nothing")
        from vlm.interop.peers import open_peer

        loaded = open_peer(text, Path(weights))
    elif weights is not None:
        raise CheckpointError(f"{text}: weights=... is for open_clip: and timm: sources; a checkpoint holds its own")
    else:
        loaded = load_model(text)  # the file read once and built as what it holds
    options = {"device": device, "batch_size": batch_size}
    if isinstance(loaded, ZeroShotModel):
        predictor: Predictor = CLIPPredictor(loaded, text, **options)
    elif isinstance(loaded, Captioner):
        predictor = CaptionPredictor(loaded, text, **options)
    else:
        predictor = VisionPredictor(loaded.model, text, loaded.image_size, loaded.mean, loaded.std, **options)
    if predictor.device.type == "cpu":  # the same numbers, on the faster CPU kernels (VLM_CPU_LINEAR: auto by default)
        from vlm.kernels import use_cpu_kernels

        use_cpu_kernels(predictor.model, os.environ.get("VLM_CPU_LINEAR") or "auto")
    return predictor


def load_flamingo(source: str | os.PathLike, purpose: str, **options: Any) -> CaptionPredictor:
    """:func:`load` for a use that needs a Flamingo: any other kind of model is a
    :class:`~vlm.formats.CheckpointError` saying what the file holds and that ``purpose`` needs a Flamingo."""
    model = load(source, **options)
    if not isinstance(model, CaptionPredictor):
        raise CheckpointError(f"{source} is a {model.kind}: {purpose} needs a Flamingo checkpoint")
    return model


__all__ = ["CLIPPredictor", "CaptionPredictor", "Predictor", "VisionPredictor", "as_pil_list", "load", "load_flamingo"]
