"""Hugging Face GPT-2 checkpoints as the weights of vlm's :class:`~vlm.models.decoder.DecoderLM`.

A GPT-2 checkpoint comes as a ``save_pretrained`` directory (``config.json`` beside ``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``) or as one of those weights files alone. Its keys
(``transformer.h.N.attn.c_attn.weight``, ...) are recognised and mapped with
:func:`~vlm.models.decoder.convert_gpt2_state_dict`. Reading is as safe as every other weights file: safetensors, or
the checked torch-file reader every checkpoint goes through (:func:`vlm.formats.read_archive`: tensors and plain
containers only, no code from the file, sizes bounded);
``config.json`` and the shard index are read bounded, and shards must lie inside the directory.

What the weights' shapes cannot show (heads, activation, LayerNorm epsilon, MLP width, GPT-2's optional attention
scalings) is checked against ``config.json`` when there is one, so a decoder configured unlike the checkpoint is
refused with the setting named instead of computing something else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.data.files import UnsafeFileError, check_regular, read_text_bounded
from vlm.interop.weights import ConversionError, activation_name, read_state_dict
from vlm.models.decoder import convert_gpt2_state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# GPT-2 config names of the activations vlm's MLP has (transformers' ACT2FN names).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "quick_gelu": "quick_gelu"}  # fmt: skip


def is_gpt2_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` has Hugging Face GPT-2's layout (``GPT2LMHeadModel`` or ``GPT2Model``)."""
    keys = {k.removeprefix("transformer.") for k in state_dict}
    return "wte.weight" in keys and "wpe.weight" in keys and "h.0.attn.c_attn.weight" in keys


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(read_text_bounded(path, what))
    except (UnsafeFileError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{what} {path} is not a JSON object")
    return value


def _read_sharded(index_path: Path) -> dict[str, Tensor]:
    """The tensors of a sharded safetensors checkpoint; every shard must be a file inside the index's directory."""
    weight_map = _read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no weight_map")
    state: dict[str, Tensor] = {}
    for shard in sorted({str(v) for v in weight_map.values()}):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ConversionError(f"{index_path}: refused shard {shard!r}: not a .safetensors file in that directory")
        state.update(read_state_dict(index_path.parent / shard))
    return state


def read_gpt2_checkpoint(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The state dict and, for a directory, the ``config.json`` of a Hugging Face checkpoint.

    ``source`` is a ``save_pretrained`` directory or a weights file; the state dict is returned as stored (convert
    it with :func:`~vlm.models.decoder.convert_gpt2_state_dict` when :func:`is_gpt2_state_dict`).

    Raises:
        ConversionError: a missing or unreadable file, a directory without weights, or a directory of another
            architecture than GPT-2.
    """
    try:
        path = check_regular(source, "weights", directory_ok=True)
    except UnsafeFileError as e:
        raise ConversionError(str(e)) from None
    if not path.is_dir():
        return read_state_dict(path), None
    config = _read_json(path / "config.json", "Hugging Face config")
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise ConversionError(f"{path} holds a Hugging Face {model_type!r} model, not GPT-2: use it as the decoder "
                              f"with vlm.models.hf_decoder.HFCausalLM (name_or_path: {path}) instead")
    for name in WEIGHT_FILES:
        if (path / name).exists():
            weights = path / name
            state = _read_sharded(weights) if name.endswith(".json") else read_state_dict(weights)
            return state, config
    raise ConversionError(f"{path} has none of {', '.join(WEIGHT_FILES)}")


def gpt2_decoder_state_dict(state_dict: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """:func:`~vlm.models.decoder.convert_gpt2_state_dict`, refusing an output head not tied to the embedding
    (DecoderLM ties them)."""
    head = state_dict.get("lm_head.weight")
    embedding = state_dict.get("transformer.wte.weight", state_dict.get("wte.weight"))
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        raise ConversionError(f"{where}: lm_head.weight differs from the token embedding; vlm's DecoderLM ties them")
    try:
        return convert_gpt2_state_dict(state_dict)
    except KeyError as e:
        raise ConversionError(f"{where}: GPT-2 weights without {e.args[0]}") from None


def check_gpt2_config(config: Mapping[str, Any], decoder: nn.Module, where: str) -> None:
    """Refuses a GPT-2 ``config.json`` whose settings the weights' shapes do not show and ``decoder`` (a
    :class:`~vlm.models.decoder.DecoderLM`) does not share; the message names the setting and both values."""
    block = decoder.layers[0]
    width = block.norm1.normalized_shape[0]
    act = config.get("activation_function", "gelu_new")
    n_embd = config.get("n_embd", width)
    inner = config.get("n_inner") or 4 * n_embd
    ours = {
        "n_head": (config.get("n_head"), block.attn.num_heads, "num_heads"),
        "activation_function": (ACTIVATIONS.get(act, act), activation_name(block.mlp.act), "act"),
        "layer_norm_epsilon": (config.get("layer_norm_epsilon", 1e-5), block.norm1.eps, "norm_eps"),
        "n_inner": (inner / n_embd, block.mlp.fc1.out_features / width, "mlp_ratio"),  # widths: by the shapes
    }
    for key, (theirs, mine, arg) in ours.items():
        if theirs != mine:
            raise ConversionError(f"{where}: config.json has {key}={config.get(key)!r} but the decoder's {arg} "
                                  f"gives {mine!r}")
    for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if config.get(flag, supported) != supported:
            raise ConversionError(f"{where}: config.json sets {flag}={config[flag]!r}, which vlm's decoder does not "
                                  f"implement")


__all__ = ["check_gpt2_config", "gpt2_decoder_state_dict", "is_gpt2_state_dict", "read_gpt2_checkpoint"]
