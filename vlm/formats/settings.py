"""The ``inference`` block of checkpoints and exports: the settings inference needs besides the weights.

The CLIP and Flamingo tasks write them into their checkpoints (``checkpoint["inference"]``) and ``vlm export`` into
``config.json``: the resolved tokenizer config, prompt templates or decoding defaults, image statistics. With them a
model loads without Lightning (see :mod:`vlm.formats.load`, which checks every one when reading it).
"""

from __future__ import annotations

from typing import Any

from vlm.generation import Captioner


def zero_shot_settings(task: Any) -> dict[str, Any] | None:
    """The settings a :class:`ZeroShotModel` needs besides the weights, as plain data for a checkpoint, or None
    where the task's tokenizer was passed as an object rather than a config (it could not be rebuilt)."""
    config = task.hparams.get("tokenizer")
    if config is None:  # the task built its default tokenizer, whose own defaults rebuild it
        cls = type(task.tokenizer)
        config = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {}}
    if not (isinstance(config, dict) and isinstance(config.get("class_path"), str)):
        return None
    templates = task.templates if isinstance(task.templates, str) else list(task.templates)
    if not all(isinstance(t, str) for t in ([templates] if isinstance(templates, str) else templates)):
        return None  # callables: only the task itself holds them
    return {"tokenizer": config, "templates": templates, "image_mean": list(task.image_mean),
            "image_std": list(task.image_std),
            "template_pooling": getattr(task, "template_pooling", "mean")}  # fmt: skip


def caption_settings(captioner: Captioner) -> dict[str, Any]:
    """A :class:`Captioner`'s settings besides the model, as plain data (its tokenizer as the config that rebuilds
    it)."""
    tok = captioner.tokenizer
    tokenizer = {"class_path": f"{type(tok).__module__}.{type(tok).__qualname__}",
                 "init_args": {"name_or_path": tok.name_or_path, "context_length": tok.context_length,
                               "vocab_offset": tok.vocab_offset, "prompt": tok.prompt,
                               "question_prompt": tok.question_prompt}}  # fmt: skip
    return {"tokenizer": tokenizer, "image_size": captioner.image_size, "image_mean": list(captioner.image_mean),
            "image_std": list(captioner.image_std), "max_new_tokens": captioner.max_new_tokens,
            "num_beams": captioner.num_beams, "vocab_ids": captioner.vocab_ids,
            "attribute_words": list(captioner.attribute_words)}  # fmt: skip


__all__ = ["caption_settings", "zero_shot_settings"]
