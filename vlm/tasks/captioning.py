"""Flamingo training: captioning with a frozen vision tower and a frozen language model (stage 3).

Only the Perceiver Resampler, the gated cross-attention blocks and the rows of the new tokens train; the vision
tower and the decoder are frozen here, once, and kept in eval mode. Validation generates captions and reports
BLEU-4 and CIDEr (pycocoevalcap's scorers, on lower-cased, punctuation-stripped words: its PTB tokenizer needs
Java) and the exact attribute accuracy of the synthetic data: the share of images whose caption names every
colour, shape and size word of the reference, in the same order, and, where the batches carry ``heldout`` flags
(:class:`~vlm.data.datasets.ImageTextCollate`), ``val/attribute_accuracy_heldout`` / ``_seen`` over the flagged /
unflagged images.

Visual question answering is the same task on question records (data rows with a ``question`` and an ``answer`` or
``answers``: :mod:`vlm.data.vqa`): each sequence is ``question_prompt`` with the question in it, then the answer, and
the loss covers only the answer, ``<|endofchunk|>`` and end-of-text. Validation then answers greedily and logs
``val/vqa_accuracy`` (VQAv2's accuracy, :mod:`vlm.vqa`), and ``val/vqa_accuracy_heldout`` / ``_seen`` where the rows
carry a ``heldout`` flag, instead of the caption metrics.

Where the frozen parts come from
--------------------------------
The config gives their *architecture* (``model.init_args.vision`` / ``.decoder``, exactly as in the CLIP and LM
configs) and, separately, where their *weights* are: ``vision_weights`` / ``decoder_weights`` name an earlier
stage's checkpoint (``runs/clip-scenes/checkpoints/last.ckpt`` and ``runs/lm/checkpoints/last.ckpt`` in the shapes
config), a ``.safetensors`` / torch state-dict file, or ``hf-hub:REPO`` (its ``model.safetensors``, for users with
internet); ``*_weights_prefix`` selects the part inside it (``model.vision.`` of a CLIP task, ``model.`` of an LM
task). ``decoder_weights`` may also be a Hugging Face GPT-2 checkpoint for a :class:`~vlm.models.decoder.DecoderLM`
of the same shape: its ``save_pretrained`` directory or weights file, recognised by its keys and converted
(:mod:`vlm.interop.hf_gpt2`; the prefix is then not used). Those files are read only when training starts
(``setup("fit")``); the Flamingo checkpoint then holds every weight, frozen ones included, and records that they
were loaded (the ``pretrained_loaded`` buffer), so rebuilding it (:func:`vlm.formats.load_task`,
``scripts/caption.py``) or resuming it never reads those files again: it works after those runs are deleted.
Swapping in another tower or a Hugging Face decoder is a config change (``vlm.models.hf_decoder.HFCausalLM`` loads
its own pretrained weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlm.captions import attribute_correct, caption_scores, shapes_attribute_words
from vlm.data.gpt2_tokenizer import (
    DEFAULT_QUESTION_PROMPT,
    END_OF_CHUNK_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    CausalLMTokenizer,
    FlamingoTokenizer,
)
from vlm.data.tokenizer import fit_context_length
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.formats.build import copy_weights
from vlm.formats.checkpoint import INFERENCE_KEY
from vlm.formats.settings import caption_settings
from vlm.generation import Captioner
from vlm.losses import next_token_loss
from vlm.models.flamingo import Flamingo
from vlm.tasks.base import Task
from vlm.tasks.language import (
    AUTO_VOCABULARY,
    check_vocabulary,
    resolve_vocabulary,
    save_resolved_vocabulary,
    vocabulary_token_ids,
)
from vlm.tasks.loading import load_init_weights
from vlm.tasks.optim import adamw, warmup_cosine_schedule
from vlm.vqa import vqa_metrics

log = logging.getLogger("vlm.tasks")


def swap_input_words(
    input_ids: Tensor, labels: Tensor, p: float, first_special_id: int, eos_token_id: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A copy of ``input_ids`` (b, n) where each caption word is, with probability ``p``, the word at the same
    position of another row; labels are not touched.

    Caption words are the positions with a label (not padding, ``<image>`` or the prompt) that hold an ordinary token
    in both rows: the new tokens (ids >= ``first_special_id``) and end-of-text are never swapped in or out.
    """
    b = input_ids.shape[0]
    if b < 2:
        return input_ids
    device = input_ids.device
    donor = torch.randint(0, b - 1, (b,), device=device, generator=generator)
    donor += (donor >= torch.arange(b, device=device)).long()  # another row, never the same one
    other, other_labels = input_ids[donor], labels[donor]

    def word(ids: Tensor, lab: Tensor) -> Tensor:
        return (lab != IGNORE_INDEX) & (ids < first_special_id) & (ids != eos_token_id)

    pick = torch.rand(input_ids.shape, device=device, generator=generator) < p
    swap = pick & word(input_ids, labels) & word(other, other_labels)
    return torch.where(swap, other, input_ids)


class FlamingoTask(Task):
    """Trains the bridge of a :class:`~vlm.models.flamingo.Flamingo` on image-caption pairs (or question records).

    Args:
        model: the Flamingo model (vision tower and decoder given as configs; see the module docstring).
        vision_weights: where the vision tower's weights are read from when training starts; None: keep them.
        vision_weights_prefix: key prefix of the tower inside that file (``model.vision.`` in a CLIP task).
        decoder_weights: where the decoder's weights are read from when training starts (also a Hugging Face GPT-2
            ``save_pretrained`` directory or weights file); None: keep them.
        decoder_weights_prefix: key prefix of the decoder inside that file (``model.`` in an LM task).
        init_weights: a trained Flamingo checkpoint to start from instead (towers, bridge and new tokens, every key
            and shape checked against ``model``): a second stage on other data or another task, e.g. question
            answering after captioning. Read when training starts, never on a resume; ``vision_weights`` and
            ``decoder_weights`` are then not read.
        tokenizer: the decoder's tokenizer, as in its language-model stage (default: GPT-2's BPE); the task extends
            it with Flamingo's tokens (:class:`~vlm.data.gpt2_tokenizer.FlamingoTokenizer`). Its context length, the
            most tokens per sequence, is capped at the decoder's and is the decoder's where it sets none.
        prompt: text between ``<image>`` and the caption (not learned, also used when generating).
        question_prompt: how question records are asked: one ``<image>`` and one ``{question}``; the answer follows
            after a space (not learned, also used when answering). Default: OpenFlamingo's
            ``<image>Question: {question} Short answer:``.
        vocabulary: a closed vocabulary (as for :class:`~vlm.tasks.language.LanguageModelTask`, whose decoder was
            trained with the same): the softmax covers only these words' tokens, ``<|endofchunk|>`` and
            end-of-text, in training and generation. ``auto``: the words of the data's training and validation
            captions (:func:`vlm.tasks.language.data_words`), resolved when training starts and saved as the list.
            ``None``: the whole vocabulary.
        learn_input_words: with a closed ``vocabulary``, the decoder's input embeddings of every other token (rows a
            language model trained on that vocabulary never trained: a question's words, the prompt's) learn with
            the bridge, so the frozen decoder reads them; the vocabulary's rows and the rest of the decoder stay as
            they are. Needs vlm's :class:`~vlm.models.decoder.DecoderLM`.
        images_per_sequence: training sequences interleave this many (image, caption) or (image, question, answer)
            chunks, consecutive batch samples grouped together (M3W-style), so the model learns sequences with
            several images and texts that follow solved examples, as few-shot prompts do.
        input_noise: in training, each caption word *as input* is replaced, with this probability, by the word at
            the same position of another caption of the batch; its label, and every label, stays the true one. The
            next word must then come from the image rather than from the words before it: without it the bridge
            learns which words followed which in the training captions (on the synthetic data: "blue" was never
            followed by "circle", so a blue circle was called a square). 0: off.
        optimizer: builds the optimizer from the trainable parameters' groups
            (:func:`vlm.tasks.optim.param_groups`). Default: :class:`vlm.tasks.optim.AdamW` with ``lr=1e-3,
            weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8``.
        lr_scheduler: builds the per-step schedule from the optimizer. Default:
            :class:`vlm.tasks.optim.WarmupCosine` with ``warmup_steps=100, min_lr_ratio=0.1``.
        max_new_tokens: caption length limit when generating on validation.
        num_beams: beams when generating on validation (1: greedy).
        attribute_words: words checked by the attribute accuracy (default: the synthetic data's colours, shapes
            and sizes); empty to skip it.
        image_size: input image side (default: the vision tower's ``image_size``).
        image_mean: per-channel normalisation mean (must match how the tower was trained).
        image_std: per-channel normalisation std.
        compile: ``torch.compile`` the training forward pass (``forward_features``), as every task compiles
            (:class:`~vlm.tasks.base.Task`); generation stays eager (its growing KV cache would recompile at every
            length). Off by default: slower than eager on the CPU (``scripts/benchmark.py --suite compile``).
    """

    def __init__(
        self,
        model: Flamingo,
        vision_weights: str | None = None,
        vision_weights_prefix: str = "model.vision.",
        decoder_weights: str | None = None,
        decoder_weights_prefix: str = "model.",
        init_weights: str | None = None,
        tokenizer: CausalLMTokenizer | None = None,
        prompt: str = "",
        question_prompt: str = DEFAULT_QUESTION_PROMPT,
        vocabulary: str | Sequence[str] | None = None,
        learn_input_words: bool = False,
        images_per_sequence: int = 1,
        input_noise: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 24,
        num_beams: int = 1,
        attribute_words: Sequence[str] | None = None,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, compile,
                         default_optimizer=adamw(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8),
                         default_lr_scheduler=warmup_cosine_schedule(warmup_steps=100, min_lr_ratio=0.1))
        if images_per_sequence < 1:
            raise ValueError(f"images_per_sequence must be >= 1, got {images_per_sequence}")
        if not 0.0 <= input_noise < 1.0:
            raise ValueError(f"input_noise must be in [0, 1), got {input_noise}")
        check_vocabulary(vocabulary)
        self.save_hyperparameters()
        self.model = model
        self._compiled_forward_features: Callable[..., Tensor] | None = None  # set by compile_parts
        self._pretrained_sources = {
            "vision": (vision_weights, vision_weights_prefix),
            "decoder": (decoder_weights, decoder_weights_prefix),
        }
        self.init_weights = init_weights
        # Set once the files above have been read; saved with the checkpoint, so a rebuilt task never rereads them.
        self.register_buffer("pretrained_loaded", torch.tensor(False))
        base = fit_context_length(tokenizer if tokenizer is not None else CausalLMTokenizer(), model.context_length)
        self.tokenizer = FlamingoTokenizer(base.name_or_path, base.context_length,
                                           vocab_offset=model.decoder.vocab_size, prompt=prompt,
                                           question_prompt=question_prompt)
        if self.tokenizer.vocab_size > model.decoder.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the decoder only "
                             f"{model.decoder.vocab_size} embeddings: is it the decoder's tokenizer?")
        self.vocabulary = vocabulary
        ids = self._vocabulary_ids(vocabulary) if vocabulary and vocabulary != AUTO_VOCABULARY else None
        self.register_buffer("vocab_ids", ids, persistent=False)  # follows from the config
        self.images_per_sequence = images_per_sequence
        self.input_noise = input_noise
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        words = shapes_attribute_words() if attribute_words is None else attribute_words
        self.attribute_words = {w.lower() for w in words}
        size = image_size if image_size is not None else getattr(model.vision, "image_size", None)
        if size is None:
            raise ValueError("the vision tower has no image_size attribute: set image_size")
        self.image_size = int(size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        # Flamingo's recipe: both pretrained parts stay frozen; only the bridge and the new token rows learn.
        self.freeze_parts(model.vision, model.decoder)
        self.learn_input_words = learn_input_words
        if learn_input_words:  # ... and the input rows of the words outside the closed vocabulary
            if not vocabulary:
                raise ValueError("learn_input_words needs a closed vocabulary: the decoder's rows outside it learn")
            embedding = getattr(model.decoder, "token_embedding", None)
            if not isinstance(embedding, nn.Embedding):
                raise ValueError("learn_input_words needs a decoder whose inputs are a token_embedding (DecoderLM)")
            embedding.weight.requires_grad_(True)
            embedding.weight.register_hook(self._input_word_gradient)
        self._val: dict[str, list] = {}

    def _input_word_gradient(self, grad: Tensor) -> Tensor:
        """The decoder embedding's gradient on the rows outside the closed vocabulary only: the rows the language
        model trained (and the tied unembedding of the vocabulary) stay as they were."""
        keep = torch.ones(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        keep[self.vocab_ids[self.vocab_ids < grad.shape[0]]] = 0
        return grad * keep

    # ------------------------------------------------------------------------------------- pretrained parts
    def _vocabulary_ids(self, words: Sequence[str]) -> Tensor:
        return vocabulary_token_ids(self.tokenizer, words,
                                    [self.tokenizer.end_of_chunk_token_id, self.tokenizer.eos_token_id])

    def setup(self, stage: str) -> None:
        resolve_vocabulary(self)  # before the new token rows are set from the vocabulary's mean
        if stage == "fit" and not bool(self.pretrained_loaded):
            if self.init_weights:  # a whole trained Flamingo (towers, bridge, new tokens): nothing else to read
                load_init_weights(self.model, self.init_weights, "model.", "the Flamingo model in the config")
                self.pretrained_loaded.fill_(True)
            else:
                self.load_pretrained()

    def load_pretrained(self) -> None:
        """Reads the frozen parts' weights from ``vision_weights`` / ``decoder_weights``."""
        from vlm.interop.parts import read_part

        parts = {"vision": self.model.vision, "decoder": self.model.decoder}
        for name, (source, prefix) in self._pretrained_sources.items():
            if source:
                copy_weights(parts[name], read_part(_resolve_weights(source), prefix, parts[name], name), source)
                log.info("loaded the %s from %s", name, source)
        if self._pretrained_sources["decoder"][0]:
            # New rows start at the mean of the loaded rows (of the closed vocabulary, if any: the others never
            # trained).
            old = self.vocab_ids[self.vocab_ids < self.model.decoder.vocab_size] if self.vocab_ids is not None else None
            self.model.init_new_tokens(old)
        self.pretrained_loaded.fill_(True)

    def compile_parts(self, options: dict[str, Any]) -> None:
        self._compiled_forward_features = torch.compile(self.model.forward_features, **options)

    # ----------------------------------------------------------------------------------------------- loss
    def _interleave(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Groups k consecutive samples into one sequence (b/k, k images), M3W-style: captions as
        ``<image>c1<|endofchunk|><image>c2...``, question records as ``<image>Question: q1 Short answer: a1
        <|endofchunk|><image>Question: q2 ...``, the loss on every caption or answer. Each text sees the texts
        before it, so the model learns to use them as examples (few-shot prompts are laid out the same way)."""
        k = self.images_per_sequence
        images = batch["image"]
        if k == 1:
            return images, batch["input_ids"], batch["labels"]
        n = images.shape[0] // k * k
        if "question" in batch:  # "caption" holds each record's training answer
            pairs = list(zip(batch["question"], batch["caption"]))
            enc = self.tokenizer.encode_question_sequences([pairs[i: i + k] for i in range(0, n, k)])
        else:
            prompt = f"{self.tokenizer.prompt} " if self.tokenizer.prompt else ""
            texts = ["".join(f"{IMAGE_TOKEN}{prompt}{c}{END_OF_CHUNK_TOKEN}" for c in batch["caption"][i: i + k])
                     for i in range(0, n, k)]
            enc = self.tokenizer.encode_batch(texts)
        images = images[:n].view(n // k, k, *images.shape[1:])
        return images, enc["input_ids"].to(images.device), enc["labels"].to(images.device)

    def compute_loss(self, images: Tensor, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy on the caption tokens (labels ignore padding, ``<image>`` and the prompt)."""
        # Right-padded batches: causal attention never reaches the padding, so no attention mask is needed.
        forward_features = self._compiled_forward_features or self.model.forward_features
        hidden = forward_features(images, input_ids)
        return next_token_loss(hidden, labels, self.model.unembed, self.vocab_ids)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, input_ids, labels = self._interleave(batch)
        if self.input_noise > 0:
            input_ids = swap_input_words(input_ids, labels, self.input_noise, self.model.decoder.vocab_size,
                                         self.tokenizer.eos_token_id)
        loss = self.compute_loss(images, input_ids, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"pred": [], "ref": [], "answers": [], "heldout": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        b = batch["image"].shape[0]
        loss = self.compute_loss(batch["image"], batch["input_ids"], batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        if "question" in batch:  # question records: greedy answers, scored against the reference answers
            self._val["pred"] += self.generate_answers(batch["image"], batch["question"])
            self._val["answers"] += [list(a) for a in batch["answers"]]
        else:
            self._val["pred"] += self.generate_captions(batch["image"])
        self._val["heldout"] += list(batch.get("heldout", [None] * b))  # per record; None: no flag
        self._val["ref"] += list(batch["caption"])

    def generate_answers(self, images: Tensor, questions: Sequence[str], max_new_tokens: int | None = None,
                         **kwargs) -> list[str]:
        """Answers to one question per image (``question_prompt`` with each question; greedy unless ``kwargs`` say
        otherwise), each cut where a model would start another turn (:func:`vlm.vqa.first_answer`)."""
        return self.captioner().generate_answers(images, questions, max_new_tokens=max_new_tokens, **kwargs)

    def generate_captions(
        self,
        images: Tensor,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **kwargs,
    ) -> list[str]:
        """Captions of a batch of images (greedy or beam search; defaults from the task's arguments): see
        :meth:`vlm.generation.Captioner.generate_captions`."""
        return self.captioner().generate_captions(images, prompt, max_new_tokens, num_beams, **kwargs)

    def captioner(self) -> Captioner:
        """What captioning needs of this task (sharing its model and tokenizer): ``scripts/caption.py``'s view."""
        return Captioner(
            model=self.model,
            tokenizer=self.tokenizer,
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            vocab_ids=None if self.vocab_ids is None else self.vocab_ids.tolist(),
            attribute_words=sorted(self.attribute_words),
        )

    def inference_settings(self) -> dict[str, Any]:
        """:meth:`captioner`'s settings besides the model, resolved, for checkpoints and exports: with them
        ``scripts/caption.py`` loads without Lightning."""
        return caption_settings(self.captioner())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_resolved_vocabulary(self, checkpoint)
        checkpoint[INFERENCE_KEY] = self.inference_settings()

    def on_validation_epoch_end(self) -> None:
        val = self._val
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, val)
            val = {k: [x for g in gathered for x in g[k]] for k in val}
        if val["answers"]:
            metrics = vqa_metrics(val["pred"], val["answers"], val["heldout"])
        else:
            metrics = caption_scores(val["pred"], val["ref"])
        if self.attribute_words and val["pred"] and not val["answers"]:
            hits = [attribute_correct(p, r, self.attribute_words) for p, r in zip(val["pred"], val["ref"])]
            metrics["attribute_accuracy"] = sum(hits) / len(hits)
            for name, keep in (("heldout", True), ("seen", False)):  # split by the batches' flags, where given
                sel = [h for h, flag in zip(hits, val["heldout"]) if flag is not None and bool(flag) == keep]
                if sel:
                    metrics[f"attribute_accuracy_{name}"] = sum(sel) / len(sel)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name.startswith("attribute_accuracy"), rank_zero_only=True)
        show = self._trainer is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking
        if show:
            for p, r in list(zip(val["pred"], val["ref"]))[:3]:
                self.print(f"  generated: {p!r}   reference: {r!r}")
        self._val = {}

    # ----------------------------------------------------------------------------------------- optimizer

def _resolve_weights(source: str) -> str:
    """A local path, or ``hf-hub:REPO`` downloaded (its ``model.safetensors``) for users with internet."""
    if source.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source[len("hf-hub:"):], "model.safetensors")
    return source


__all__ = ["FlamingoTask", "swap_input_words"]
