"""Contrastive image-text training (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023).

The loss is computed across all GPUs: every rank gathers the features of every other rank *with gradients*, so
each image is contrasted with every caption in the global batch, and computes only its own rows of the logit
matrix (its labels are offset by ``rank * local_batch``). Summed over ranks this is exactly the loss of one
process holding the whole batch, and so are the gradients.

With ``accumulate_micro_batches=k`` a batch is encoded k micro-batches at a time and still contrasted as a whole
(GradCache, Gao et al. 2021; open_clip's ``accum_freq``): every image still meets every caption of the global batch,
the gradient is the full batch's, and the activation memory is about one micro-batch's.

Compositional supervision from the captions (``attribute_positives``, ``compose_text``) is exact in the same way:
see :mod:`vlm.tasks.compositional`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from vlm.data.hf_tokenizer import HFTokenizer
from vlm.data.tokenizer import CLIPTokenizer, fit_context_length
from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.formats.checkpoint import INFERENCE_KEY
from vlm.formats.settings import zero_shot_settings
from vlm.losses import ContrastiveLoss, contrastive_loss
from vlm.metrics import attribute_top1, retrieval_recall, zero_shot_accuracy
from vlm.models.clip import CLIP
from vlm.reliability import restore_rng, snapshot_rng
from vlm.tasks.base import Task
from vlm.tasks.compositional import CompositionalTerms, Plan
from vlm.tasks.loading import load_init_weights
from vlm.tasks.optim import adamw, warmup_cosine_schedule
from vlm.zero_shot import POOLINGS, build_classifier, class_logits

log = logging.getLogger("vlm.tasks")


class ContrastiveTask(CompositionalTerms, Task):
    """Trains a :class:`~vlm.models.clip.CLIP` with a contrastive loss (CLIP's softmax, SigLIP's sigmoid...).

    Args:
        model: the CLIP model.
        tokenizer: turns captions and zero-shot prompts into token ids (default: CLIP's BPE). Its context length is
            capped at the text tower's (:func:`~vlm.data.tokenizer.fit_context_length`), so a config states it once,
            on the tower; only a tower without a fixed length (a Hugging Face encoder) leaves it to the tokenizer.
        loss: the loss (:class:`vlm.losses.ContrastiveLoss`): ``{class_path: vlm.losses.ClipLoss}`` (symmetric
            cross-entropy, the default) or ``vlm.losses.SigLipLoss`` (needs ``model.logit_bias``), or any subclass
            in :mod:`vlm.losses`; the names ``clip`` and ``siglip`` also work. ``val/loss`` is this loss too, over
            each validation batch alone.
        optimizer: builds the optimizer from the parameter groups (:func:`vlm.tasks.optim.param_groups`: no weight
            decay for biases, norms, embeddings and the temperature). Default: :class:`vlm.tasks.optim.AdamW` with
            ``lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6``.
        lr_scheduler: builds the per-step schedule from the optimizer. Default:
            :class:`vlm.tasks.optim.WarmupCosine` with ``warmup_steps=100, min_lr_ratio=0.0``.
        lock_image: freeze the image tower (LiT, Zhai et al. 2022), except its last ``lock_image_unlocked_blocks``.
        lock_image_unlocked_blocks: number of final image blocks (and the final norm) left trainable.
        lock_text: freeze the text tower (e.g. a pretrained language model).
        templates: zero-shot prompt templates used on validation (``{}`` is replaced by the class name), the
            name of a template set (see :func:`vlm.zero_shot.get_templates`), or ``auto``: the training captions'
            own frames around their labels, resolved when a Trainer sets the task up and saved resolved (see
            :mod:`vlm.tasks.compositional`). ``template_pooling``: ``mean`` (CLIP's prompt ensemble) or ``marginal``
            (a class's probability summed over which template fits; see :func:`vlm.zero_shot.build_classifier`).
        image_mean: per-channel normalisation mean of the input images.
        image_std: per-channel normalisation std.
        accumulate_micro_batches: encode each training batch in this many equal micro-batches (the batch size must
            be divisible by it) for about ``1/k`` of the activation memory, while the loss, its negatives and the
            gradient stay exactly those of the whole batch (unlike ``Trainer(accumulate_grad_batches)``, which
            contrasts each small batch only with itself). Costs one extra forward pass per micro-batch.
        compile: ``torch.compile`` the towers in place when a Trainer sets the task up: ``True`` or its keyword
            arguments (``{"mode": "max-autotune"}``); checkpoints are the same. Off by default (slower on the CPU).
        same_caption_positive: pairs whose captions are identical token for token (anywhere in the global batch)
            are positives too, rather than asking the model to tell identical captions apart: matters where captions
            recur in a batch (class-name captions), changes nothing on web data. Off by default, as in CLIP.
        cache_locked_text: with ``lock_text``, keep the frozen text tower's output per distinct caption (in memory,
            not saved): pays where captions recur; on web data it only grows.
        init_weights: a checkpoint or state dict (``.ckpt``, ``.pt``, ``.safetensors``) whose CLIP weights the
            model starts from when training begins, with a fresh optimizer and schedule (fine-tuning, or a second
            stage on other data). Its keys under ``init_weights_prefix`` must match the model exactly. Not read
            when resuming from a checkpoint (``--ckpt_path``), which brings its own weights.
        init_weights_prefix: the prefix of the CLIP weights in ``init_weights`` (``model.`` in a ContrastiveTask
            checkpoint, ``""`` for a bare CLIP state dict).
        attribute_positives: weight of a loss term in which each label word, alone in its caption's frame ("a large
            teal", "a large triangle" for "a large teal triangle"), is a positive of the image against the batch's
            other such phrases (see :mod:`vlm.tasks.compositional`). 0 (off) by default.
        compose_text: weight of a text-only term tying the captions of recombined label words (unseen pairs too)
            to the sum of their attribute phrases' embeddings (see :mod:`vlm.tasks.compositional`). 0 by default.
    """

    def __init__(
        self,
        model: CLIP,
        tokenizer: CLIPTokenizer | HFTokenizer | None = None,
        loss: ContrastiveLoss | str = "clip",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lock_image: bool = False,
        lock_image_unlocked_blocks: int = 0,
        lock_text: bool = False,
        templates: str | Sequence[str] = ("a photo of a {}.",),
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        accumulate_micro_batches: int = 1,
        compile: bool | dict[str, Any] = False,
        same_caption_positive: bool = False,
        cache_locked_text: bool = False,
        init_weights: str | None = None,
        init_weights_prefix: str = "model.",
        attribute_positives: float = 0.0,
        compose_text: float = 0.0,
        template_pooling: str = "mean",
    ) -> None:
        super().__init__(optimizer, lr_scheduler, compile,
                         default_optimizer=adamw(lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
                         default_lr_scheduler=warmup_cosine_schedule(warmup_steps=100, min_lr_ratio=0.0))
        if accumulate_micro_batches < 1:
            raise ValueError(f"accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")
        loss_fn = contrastive_loss(loss)  # a new name: save_hyperparameters reads the arguments from the locals
        if loss_fn.needs_logit_bias and model.logit_bias is None:
            raise ValueError(f"the {type(loss_fn).__name__} needs a model built with init_logit_bias (e.g. -10)")
        if attribute_positives < 0 or compose_text < 0:
            raise ValueError(f"attribute_positives and compose_text are loss weights >= 0, got {attribute_positives}"
                             f" and {compose_text}")
        if template_pooling not in POOLINGS:
            raise ValueError(f"template_pooling must be one of {POOLINGS}, got {template_pooling!r}")
        if cache_locked_text and not lock_text:
            raise ValueError("cache_locked_text needs lock_text=True: a text tower that trains changes its features")
        self.save_hyperparameters()
        # Kept as attributes: under LightningCLI ``hparams`` holds only the keys the config spelled out.
        self.loss = loss_fn  # a module: learnable scalars it holds are saved and trained with the task
        self.model = model
        self.tokenizer = fit_context_length(tokenizer if tokenizer is not None else CLIPTokenizer(),
                                            getattr(model.text, "context_length", None))
        self.templates = templates if isinstance(templates, str) else list(templates)
        self.template_pooling = template_pooling
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.accumulate_micro_batches = accumulate_micro_batches
        self.freeze_parts(*self._lock(lock_image, lock_image_unlocked_blocks, lock_text))
        self.same_caption_positive = same_caption_positive
        self._text_cache: dict[bytes, Tensor] | None = {} if cache_locked_text else None
        self._val_outputs: dict[str, list[Tensor]] = {}
        self._classifier: Tensor | None = None
        self.init_weights, self.init_weights_prefix = init_weights, init_weights_prefix
        self.attribute_positives, self.compose_text = float(attribute_positives), float(compose_text)

    # ------------------------------------------------------------------------------------------ start weights
    def setup(self, stage: str) -> None:
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if stage == "fit" and self.init_weights and not resuming:
            self.load_init_weights()
        if self.templates == "auto":
            self.templates = self._derived_templates()

    def load_init_weights(self) -> None:
        """Copies the CLIP weights of ``init_weights`` into the model (keys and shapes checked)."""
        load_init_weights(self.model, self.init_weights, self.init_weights_prefix, "the CLIP model in the config")
        if self._text_cache is not None:
            self._text_cache.clear()

    # ----------------------------------------------------------------------------------------------- freezing
    def _lock(self, lock_image: bool, unlocked_blocks: int, lock_text: bool) -> list[nn.Module]:
        """The parts of the requested towers to freeze (see :meth:`Task.freeze_parts`)."""
        frozen: list[nn.Module] = []
        if lock_image:
            lock = getattr(self.model.vision, "lock", None)  # a tower that knows its blocks locks itself
            if lock is not None:
                frozen += lock(unlocked_blocks)
            elif unlocked_blocks > 0:
                raise ValueError("lock_image_unlocked_blocks needs an image tower with lock(unlocked_blocks)")
            else:
                frozen.append(self.model.vision)
        if lock_text:
            frozen.append(self.model.text)
        return frozen

    # --------------------------------------------------------------------------------------- image settings
    @property
    def image_size(self) -> int:
        return self.model.vision.image_size

    # ------------------------------------------------------------------------------------------------- loss
    def _gather(self, x: Tensor) -> Tensor:
        """All ranks' rows, differentiable (the backward sums the gradient from every rank onto the owner)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x, sync_grads=True).flatten(0, 1)  # (world, b, d) -> (world*b, d)

    def encode(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """The unit-length image and text features: ``self.model(images, text)``, through the text cache if on."""
        if self._text_cache is None:
            return self.model(images, text)
        return self.model.encode_image(images), F.normalize(self.model.text_proj(self._cached_text(text)), dim=-1)

    @torch.no_grad()
    def _cached_text(self, text: Tensor) -> Tensor:
        """The locked text tower's pooled output (b, width), computed only for captions not seen before."""
        keys = [row.tobytes() for row in text.cpu().numpy()]
        new = {k: i for i, k in enumerate(keys) if k not in self._text_cache}  # also de-duplicates the batch
        if new:
            out = self.model.text(text[list(new.values())])
            self._text_cache.update(zip(new, out))
        return torch.stack([self._text_cache[k] for k in keys])

    def inference_settings(self) -> dict[str, Any] | None:
        """What zero-shot classification needs besides the weights, resolved (tokenizer config, templates, image
        statistics), for checkpoints and exports: with it ``scripts/zero_shot.py`` loads without Lightning."""
        settings = zero_shot_settings(self)
        if settings is not None:  # the tokenizer as it runs here: its context length fitted to the text tower
            settings["templates"] = self.resolved_templates()
            tokenizer = settings["tokenizer"]
            init_args = {**(tokenizer.get("init_args") or {}), "context_length": self.tokenizer.context_length}
            settings["tokenizer"] = {**tokenizer, "init_args": init_args}
        return settings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and hparams.get("templates") == "auto":  # saved as what it resolved to
            checkpoint["hyper_parameters"] = {**hparams, "templates": self.resolved_templates()}
        settings = self.inference_settings()
        if settings is not None:
            checkpoint[INFERENCE_KEY] = settings

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self._text_cache is not None:
            self._text_cache.clear()  # other weights may arrive (a different locked tower)

    def compute_loss(self, images: Tensor, text: Tensor, captions: Sequence[str] | None = None,
                     labels: Sequence[str] | None = None) -> Tensor:
        """The batch's loss (``captions`` and ``labels``: its strings, needed by the compositional terms)."""
        image_features, text_features = self.encode(images, text)
        plan = self.compositional_plan(captions, labels, images.shape[0])
        extra = self._encode_extra(plan)
        return self.features_loss(image_features, text_features, text, plan, extra)

    def features_loss(self, image_features: Tensor, text_features: Tensor, text: Tensor | None = None,
                      plan: Plan | None = None, extra: Tensor | None = None) -> Tensor:
        """The contrastive loss of this rank's features against every rank's (``text``: this rank's token ids, needed
        with ``same_caption_positive``), plus the compositional terms of ``plan`` (``extra``: its texts' features)."""
        main = self._contrastive_loss(image_features, text_features, text)
        extra_loss = self.compositional_loss(image_features, extra, plan)
        return main if extra_loss is None else main + extra_loss

    def _contrastive_loss(self, image_features: Tensor, text_features: Tensor, text: Tensor | None) -> Tensor:
        all_image, all_text = self._gather(image_features), self._gather(text_features)
        offset = (self.global_rank if self._trainer is not None else 0) * image_features.shape[0]
        same = None
        if self.same_caption_positive:
            if text is None:
                raise ValueError("same_caption_positive needs the captions' token ids")
            distributed = self._trainer is not None and self.trainer.world_size > 1
            all_ids = self.all_gather(text).flatten(0, 1) if distributed else text
            same = (text[:, None, :] == all_ids[None, :, :]).all(dim=-1)  # (b, B), True on the diagonal at offset
        return self.loss(image_features, text_features, all_image, all_text, self.model.logit_scale,
                         self.model.logit_bias, offset, same)

    def accumulated_loss(self, images: Tensor, text: Tensor, captions: Sequence[str] | None = None,
                         labels: Sequence[str] | None = None) -> Tensor:
        """The batch's loss, with its gradient computed one micro-batch at a time (GradCache).

        1. Every micro-batch is encoded without a graph; the random state before each is kept.
        2. The loss over all the features (every rank's, gathered) is differentiated w.r.t. the features and the
           temperature, the only inputs it has.
        3. Each micro-batch is encoded again, now with a graph, from its saved random state (the same dropout, patch
           dropout and drop path, hence the same features), and backpropagates its rows of that gradient.

        The compositional terms' few texts are encoded once, with a graph, and their share of the gradient is returned
        with the last micro-batch's.

        The gradients of all but the last micro-batch accumulate in ``.grad`` here; the last is left to Lightning:
        the returned tensor's value is the loss (logged, checked by :class:`~vlm.callbacks.NonFiniteGuard`), its
        gradient the last micro-batch's share and the temperature's. So Lightning's backward, clipping, optimizer and
        schedule steps run as usual (no manual optimization, which would refuse ``Trainer(gradient_clip_val)``).
        Under DDP, the backward passes here run inside DDP's forward (it wraps ``training_step``), before DDP expects
        gradients, so they stay local; Lightning's backward then all-reduces the accumulated sum once. Lightning zeroes
        the gradients between ``training_step`` and its backward: with micro-batches :meth:`training_step` zeroes
        them first instead (see :meth:`optimizer_zero_grad`).
        """
        k, b = self.accumulate_micro_batches, images.shape[0]
        if b % k:
            raise ValueError(f"the batch size {b} is not divisible by accumulate_micro_batches={k}: choose a batch "
                             "size that is a multiple of it (and keep drop_last on)")
        chunks = list(zip(images.chunk(k), text.chunk(k)))
        states, features = [], []
        with torch.no_grad():
            for micro in chunks:
                states.append(snapshot_rng())
                features.append(self.encode(*micro))
        image_features = torch.cat([f[0] for f in features]).requires_grad_()
        text_features = torch.cat([f[1] for f in features]).requires_grad_()
        # The loss's scalar inputs besides the features: the model's temperature and bias, and any the loss holds.
        scalars = (self.model.logit_scale, self.model.logit_bias, *self.loss.parameters())
        temperature = [p for p in scalars if p is not None and p.requires_grad]
        plan = self.compositional_plan(captions, labels, b)
        extra = self._encode_extra(plan)  # no random layers in a text tower: the random state is not disturbed
        extra_leaf = None if extra is None else extra.detach().requires_grad_(extra.requires_grad)
        leaves = [image_features, text_features] + ([extra_leaf] if extra is not None and extra.requires_grad else [])
        loss = self.features_loss(image_features, text_features, text, plan, extra_leaf)
        grads = list(torch.autograd.grad(loss, [*leaves, *temperature], allow_unused=True))
        extra_grad = grads.pop(2) if len(leaves) == 3 else None
        image_grads, text_grads = grads[0].chunk(k), grads[1].chunk(k)
        # Lightning multiplies the returned loss before backpropagating it; the shares backpropagated here alike.
        factor = self._loss_multiplier()
        for i, micro in enumerate(chunks[:-1]):
            restore_rng(states[i])
            torch.autograd.backward(list(self.encode(*micro)), [image_grads[i] * factor, text_grads[i] * factor])
        restore_rng(states[-1])  # after this replay the generators are where step 1 left them
        image_last, text_last = self.encode(*chunks[-1])
        share = (image_last * image_grads[-1]).sum() + (text_last * text_grads[-1]).sum()
        share = share + sum((p * g).sum() for p, g in zip(temperature, grads[2:]) if g is not None)
        if extra_grad is not None:
            share = share + (extra * extra_grad).sum()
        return loss.detach() + (share - share.detach())  # value: the loss; gradient: the share's

    def _loss_multiplier(self) -> float:
        """What Lightning multiplies the returned loss by before its backward: the fp16 loss scale, divided by
        ``Trainer(accumulate_grad_batches)``."""
        if self._trainer is None:
            return 1.0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return (scaler.get_scale() if scaler is not None else 1.0) / self.trainer.accumulate_grad_batches

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, text = batch["image"], batch["text"]
        strings = (batch.get("caption"), batch.get("label")) if self.compositional else (None, None)
        if self.accumulate_micro_batches > 1:
            if self._trainer is not None and batch_idx % self.trainer.accumulate_grad_batches == 0:
                self.optimizers().zero_grad()  # Lightning's own comes after training_step: see optimizer_zero_grad
            loss = self.accumulated_loss(images, text, *strings)
        else:
            loss = self.compute_loss(images, text, *strings)
        b = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/temperature", 1.0 / self.model.logit_scale.detach().exp(), batch_size=b)
        return loss

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self.accumulate_micro_batches == 1:  # else training_step zeroed them, before its micro-batches
            optimizer.zero_grad()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.clamp_logit_scale()  # after every optimizer step, as CLIP does

    def compile_parts(self, options: dict[str, Any]) -> None:
        # Each tower in place (``nn.Module.compile``): parameter names, hence checkpoints, do not change.
        self.model.vision.compile(**options)
        self.model.text.compile(**options)

    # ------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {"image": [], "text": [], "target": [], "heldout": []}
        dm = self.trainer.datamodule if self._trainer is not None else None
        self._classnames = list(getattr(dm, "classnames", []) or [])
        self._classifier = None
        if self._classnames:
            self._classifier = build_classifier(self.model, self.tokenizer, self._classnames, self.resolved_templates(),
                                                self.template_pooling)  # fmt: skip

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image_features, text_features = self.encode(batch["image"], batch["text"])
        b = image_features.shape[0]
        loss = self.loss(image_features, text_features, image_features, text_features, self.model.logit_scale,
                         self.model.logit_bias, 0)  # the training loss, over this batch alone
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        self._val_outputs["image"].append(image_features)
        self._val_outputs["text"].append(text_features)
        if self._classifier is not None and "label" in batch:
            index = {c: i for i, c in enumerate(self._classnames)}
            target = torch.tensor([index.get(lbl, -1) for lbl in batch["label"]], device=self.device)
            self._val_outputs["target"].append(target)
            if "heldout" in batch:  # per image: a class never seen in training (the collate's flag)
                flags = [bool(h) for h in batch["heldout"]]
                self._val_outputs["heldout"].append(torch.tensor(flags, dtype=torch.bool, device=self.device))

    def on_validation_epoch_end(self) -> None:
        image = self._gather_eval(torch.cat(self._val_outputs["image"]))
        text = self._gather_eval(torch.cat(self._val_outputs["text"]))
        metrics = retrieval_recall(image, text, ks=(1, 5))
        if self._val_outputs["target"]:
            target = self._gather_eval(torch.cat(self._val_outputs["target"]))
            flags = self._val_outputs["heldout"]  # split held-out / seen only when every batch carried the flags
            heldout = self._gather_eval(torch.cat(flags)) if len(flags) == len(self._val_outputs["target"]) else None
            logits = class_logits(image, self._classifier, self.model.logit_scale)  # all images and targets gathered
            metrics.update(zero_shot_accuracy(logits, target, heldout))
            metrics.update(attribute_top1(logits, target, self._classnames))  # val/attribute{k}_top1
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in ("zero_shot_top1", "zero_shot_top1_heldout"))
        self._val_outputs = {}

    def _gather_eval(self, x: Tensor) -> Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)

    # ------------------------------------------------------------------------------------------- optimizer


__all__ = ["ContrastiveTask"]
