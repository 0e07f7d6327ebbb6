"""Any Hugging Face causal language model (GPT-2, OPT, Llama, Mistral, Qwen, ...) as a decoder for Flamingo.

:class:`HFCausalLM` wraps ``transformers.AutoModelForCausalLM`` as a :class:`~vlm.models.protocols.CausalDecoder`
(``embed_tokens``, ``forward_hidden``, ``unembed``, ``layers``, a cache; ``forward`` and generation inherited), so
:class:`~vlm.models.flamingo.Flamingo` can freeze it and insert its gated cross-attention before its layers. The
model is loaded from a local directory (``save_pretrained`` output) or, for users who have network access, a hub
name; nothing here reaches for the network by itself.

The hidden states come from the model's base transformer (after its final norm) and the logits from its output
embedding, so Flamingo can add logits for its new tokens from the same hidden states. Architecture-specific logit
post-processing done inside some ``*ForCausalLM.forward`` (e.g. Gemma-2's soft-capping) is therefore not applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlm.models.decoder import positions_from_mask
from vlm.models.hf_local import check_attn_implementation, check_local_dir, torch_dtype
from vlm.models.protocols import CausalDecoder


def _find_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder's list of transformer layers: the one ``ModuleList`` with ``num_hidden_layers`` entries."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(lists) != 1:
        raise ValueError(
            f"cannot tell which ModuleList holds the {num_layers} decoder layers of {type(model).__name__} "
            f"(found {len(lists)} candidates)"
        )
    return lists[0]


class HFCausalLM(CausalDecoder):
    """A ``transformers`` causal LM behind the decoder surface Flamingo uses.

    Args:
        name_or_path: local directory or hub name of the model (``AutoModelForCausalLM``).
        pretrained: load the weights; ``False`` builds the architecture from its config with random weights
            (weights then come from a checkpoint, e.g. when a Flamingo checkpoint is rebuilt).
        dtype: parameter dtype to load in (``"bfloat16"``, ``"float16"``, ``"float32"`` or their short names, see
            :data:`vlm.models.hf_local.DTYPES`); ``None`` for float32.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``None`` (the model config's choice) or, where the
            ``flash_attn`` package is installed, ``"flash_attention_2"``; never a Hub kernel.
        grad_checkpointing: recompute layer activations in the backward pass (the model's own implementation,
            which acts in training mode only; for a frozen decoder use the strategy's activation checkpointing,
            e.g. FSDP's ``activation_checkpointing_policy``).
    """

    def __init__(
        self,
        name_or_path: str,
        pretrained: bool = True,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.name_or_path = name_or_path
        # Checked before transformers sees anything: it would look a dtype string up on torch, fetch a Hub kernel
        # named as the attention, and ask on the terminal whether to run a directory's own code.
        param_dtype = torch_dtype(dtype, "HFCausalLM dtype")
        check_attn_implementation(attn_implementation, "HFCausalLM")
        check_local_dir(name_or_path)
        kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if pretrained:
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=param_dtype, trust_remote_code=False,
                                                              **kwargs)
        else:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_config(config, dtype=param_dtype, trust_remote_code=False, **kwargs)
        if grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = self.model.config
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        # Hidden size of the layers; the embeddings may be narrower (OPT-350m projects 512 <-> 1024).
        self.width = config.hidden_size
        self.embed_dim = self.model.get_input_embeddings().embedding_dim
        self.context_length = getattr(config, "max_position_embeddings", None) or 1 << 30
        self._layers = [_find_layers(self.model, config.num_hidden_layers)]  # a list: not registered twice

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers[0]

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @staticmethod
    def reorder_cache(cache: Any, index: Tensor) -> None:
        cache.reorder_cache(index)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward_hidden(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any | None = None,
    ) -> Tensor:
        """Token embeddings (b, n, width) -> final hidden states (b, n, width); arguments as for DecoderLM."""
        b, n, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + n > self.context_length:
            raise ValueError(
                f"the sequence has {past + n} tokens, more than the decoder's context length {self.context_length}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, n)
        out = self.model.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @property
    def unembedding_weight(self) -> Tensor:
        return self.model.get_output_embeddings().weight

    def unembed(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """Hidden states -> logits over the vocabulary, or only those of ``token_ids``."""
        head = self.model.get_output_embeddings()
        if token_ids is None:
            return head(hidden)
        bias = head.bias[token_ids] if getattr(head, "bias", None) is not None else None
        return torch.nn.functional.linear(hidden, head.weight[token_ids], bias)


__all__ = ["HFCausalLM"]
