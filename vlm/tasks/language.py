"""Language-model pretraining: next-token cross-entropy on text (stage 2 of the Flamingo recipe).

The decoder trained here is the one :class:`~vlm.tasks.captioning.FlamingoTask` later freezes, so its checkpoint
(``runs/lm/checkpoints/last.ckpt`` by default) is what the Flamingo config reads its decoder weights from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlm.data.gpt2_tokenizer import IGNORE_INDEX, CausalLMTokenizer
from vlm.data.sources import captions_and_labels
from vlm.data.tokenizer import fit_context_length
from vlm.losses import next_token_loss
from vlm.tasks.base import Task
from vlm.tasks.optim import adamw, warmup_cosine_schedule

AUTO_VOCABULARY = "auto"


def check_vocabulary(vocabulary: str | Sequence[str] | None) -> None:
    """A vocabulary argument is a list of words, ``auto`` or None."""
    if isinstance(vocabulary, str) and vocabulary != AUTO_VOCABULARY:
        raise ValueError(f"vocabulary must be a list of words, {AUTO_VOCABULARY!r} or null, got {vocabulary!r}")


def data_words(datamodule: Any) -> list[str]:
    """``vocabulary: auto``: the words (split at white space) of a data module's training and validation texts.

    Validation's words count too, so a validation text never holds a token the softmax lacks; they are words, not
    pairs: nothing of which words go together reaches the model from them.

    Raises:
        ValueError: the data module has no texts to read the words from.
    """
    texts: list[str] = []
    if hasattr(datamodule, "texts"):  # a text data module (the language-model stage)
        texts = datamodule.texts("train") + datamodule.texts("validation")
    else:  # an image-text data module, set up: its data sets' captions
        for dataset in (getattr(datamodule, "train_dataset", None), getattr(datamodule, "val_dataset", None)):
            pairs = captions_and_labels(dataset)
            texts += pairs[0] if pairs is not None else []
    words = sorted({word for text in texts if isinstance(text, str) for word in text.split()})
    if not words:
        raise ValueError("vocabulary: auto found no texts in the data module to take the words from: list the words")
    return words


def vocabulary_token_ids(tokenizer, words: Sequence[str], extra: Sequence[int] = ()) -> Tensor:
    """Sorted ids of every token that spells ``words`` (at the start of a text or after a space), plus ``extra``."""
    ids = set(extra)
    for word in words:
        ids.update(tokenizer.encode(word))
        ids.update(tokenizer.encode(" " + word))
    return torch.tensor(sorted(ids), dtype=torch.long)


class LanguageModelTask(Task):
    """Trains a causal decoder (e.g. :class:`~vlm.models.decoder.DecoderLM`) on text.

    Args:
        model: the decoder.
        tokenizer: the decoder's tokenizer (default: GPT-2's BPE, shipped offline). Its context length, the most
            tokens per training sequence, is capped at the decoder's and is the decoder's where it sets none
            (:func:`~vlm.data.tokenizer.fit_context_length`).
        vocabulary: a closed vocabulary: the words the texts are made of. The softmax then covers only their
            tokens and end-of-text instead of all of the BPE's (most of a small model's cost otherwise); a text
            with another token is an error. ``auto``: the words of the data's training and validation texts
            (:func:`data_words`), resolved when training starts and saved as the list. ``None``: the whole
            vocabulary.
        optimizer: builds the optimizer from the parameter groups (:func:`vlm.tasks.optim.param_groups`). Default:
            :class:`vlm.tasks.optim.AdamW` with ``lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8``.
        lr_scheduler: builds the per-step schedule from the optimizer. Default:
            :class:`vlm.tasks.optim.WarmupCosine` with ``warmup_steps=100, min_lr_ratio=0.1``.
        compile: ``torch.compile`` the training forward pass (``forward_hidden``), as every task compiles
            (:class:`~vlm.tasks.base.Task`); generation stays eager (its growing KV cache would recompile at every
            length). Off by default: slower than eager on the CPU (``scripts/benchmark.py --suite compile``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: CausalLMTokenizer | None = None,
        vocabulary: str | Sequence[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        check_vocabulary(vocabulary)
        super().__init__(optimizer, lr_scheduler, compile,
                         default_optimizer=adamw(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
                         default_lr_scheduler=warmup_cosine_schedule(warmup_steps=100, min_lr_ratio=0.1))
        self.save_hyperparameters()
        self.model = model
        self._compiled_forward_hidden: Callable[..., Tensor] | None = None  # set by compile_parts
        self.tokenizer = fit_context_length(tokenizer if tokenizer is not None else CausalLMTokenizer(),
                                            model.context_length)
        if self.tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the decoder only {model.vocab_size} embeddings"
            )
        # Not a persistent buffer: it follows from the config, and moves to the model's device with it.
        self.vocabulary = vocabulary
        ids = self._vocabulary_ids(vocabulary) if vocabulary and vocabulary != AUTO_VOCABULARY else None
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.val_nll = MeanMetric()

    def _vocabulary_ids(self, words: Sequence[str]) -> Tensor:
        return vocabulary_token_ids(self.tokenizer, words, [self.tokenizer.eos_token_id])

    def setup(self, stage: str) -> None:
        resolve_vocabulary(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_resolved_vocabulary(self, checkpoint)

    def compute_loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        # Right-padded batches: causal attention never reaches the padding, so no attention mask is needed.
        forward_hidden = self._compiled_forward_hidden or self.model.forward_hidden
        hidden = forward_hidden(self.model.embed_tokens(input_ids))
        return next_token_loss(hidden, labels, self.model.unembed, self.vocab_ids)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch["input_ids"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.compute_loss(batch["input_ids"], batch["labels"])
        b = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self.val_nll.update(loss, weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        # Perplexity per predicted token over the whole validation set (all ranks: torchmetrics syncs).
        self.log("val/perplexity", torch.exp(self.val_nll.compute().clamp(max=50.0)))
        self.val_nll.reset()

    def compile_parts(self, options: dict[str, Any]) -> None:
        self._compiled_forward_hidden = torch.compile(self.model.forward_hidden, **options)


def resolve_vocabulary(task: Any) -> None:
    """``vocabulary: auto`` becomes the data's words (:func:`data_words`) once the data module is there."""
    if task.vocabulary == AUTO_VOCABULARY:
        task.vocabulary = data_words(task.trainer.datamodule)
        task.vocab_ids = task._vocabulary_ids(task.vocabulary).to(task.device)


def save_resolved_vocabulary(task: Any, checkpoint: dict) -> None:
    """A checkpoint of an ``auto`` vocabulary holds the words it resolved to (a rebuilt task needs no data)."""
    hparams = checkpoint.get("hyper_parameters")
    resolved = task.vocabulary != AUTO_VOCABULARY
    if isinstance(hparams, dict) and hparams.get("vocabulary") == AUTO_VOCABULARY and resolved:
        checkpoint["hyper_parameters"] = {**hparams, "vocabulary": list(task.vocabulary)}


__all__ = ["AUTO_VOCABULARY", "LanguageModelTask", "data_words", "resolve_vocabulary", "save_resolved_vocabulary",
           "vocabulary_token_ids"]
