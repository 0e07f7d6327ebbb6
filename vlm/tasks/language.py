"""Language-model pretraining: next-token cross-entropy on text (stage 2 of the Flamingo recipe).

The decoder trained here is the one :class:`~vlm.tasks.captioning.FlamingoTask` later freezes, so its checkpoint
(``runs/lm/checkpoints/last.ckpt`` by default) is what the Flamingo config reads its decoder weights from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlm.data.gpt2_tokenizer import IGNORE_INDEX, CausalLMTokenizer
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.tasks.loading import CheckedLoading
from vlm.tasks.optim import build_optimizer


def vocabulary_token_ids(tokenizer, words: Sequence[str], extra: Sequence[int] = ()) -> Tensor:
    """Sorted ids of every token that spells ``words`` (at the start of a text or after a space), plus ``extra``."""
    ids = set(extra)
    for word in words:
        ids.update(tokenizer.encode(word))
        ids.update(tokenizer.encode(" " + word))
    return torch.tensor(sorted(ids), dtype=torch.long)


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


class LanguageModelTask(CheckedLoading, L.LightningModule):
    """Trains a causal decoder (e.g. :class:`~vlm.models.decoder.DecoderLM`) on text.

    Args:
        model: the decoder.
        tokenizer: Hugging Face tokenizer name or directory; ``None`` for GPT-2's BPE (shipped offline).
        context_length: most tokens per training sequence (default: the decoder's context length).
        vocabulary: a closed vocabulary: the words the texts are made of. The softmax then covers only their
            tokens and end-of-text instead of all of the BPE's (most of a small model's cost otherwise); a text
            with another token is an error. ``None``: the whole vocabulary.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio``.
        image_size: only so an image-text data module can serve its captions (images are ignored).
        image_mean: as ``image_size``.
        image_std: as ``image_size``.
        compile: ``torch.compile`` the training forward pass (``forward_hidden``) when a Trainer sets the task up:
            ``True``, or ``torch.compile``'s keyword arguments (e.g. ``{"mode": "max-autotune"}``). Generation stays
            eager (its growing KV cache would recompile at every length). The weights are untouched, so checkpoints
            are the same with and without. Off by default: on the CPU it did not pay (0.86x on the CLIP step,
            ``scripts/benchmark.py --suite compile``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: str | None = None,
        context_length: int | None = None,
        vocabulary: Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        image_size: int = 224,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = model
        self.compile_options = compile
        self._compiled_forward_hidden: Callable[..., Tensor] | None = None  # set by configure_model
        length = min(context_length or model.context_length, model.context_length)
        self.tokenizer = CausalLMTokenizer(tokenizer, context_length=length)
        if self.tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the decoder only {model.vocab_size} embeddings"
            )
        # Not a persistent buffer: it follows from the config, and moves to the model's device with it.
        ids = vocabulary_token_ids(self.tokenizer, vocabulary, [self.tokenizer.eos_token_id]) if vocabulary else None
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.optim_args = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                               warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        self.image_size = image_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.val_nll = MeanMetric()

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

    def configure_model(self) -> None:
        if self.compile_options and self._compiled_forward_hidden is None:
            options = self.compile_options if isinstance(self.compile_options, dict) else {}
            self._compiled_forward_hidden = torch.compile(self.model.forward_hidden, **options)

    def configure_optimizers(self):
        return build_optimizer(self, **self.optim_args)


__all__ = ["LanguageModelTask", "next_token_loss", "vocabulary_token_ids"]
