"""The weights of one part of a model (a Flamingo's frozen vision tower or decoder), read from the file a user has.

A part's file is a trained vlm stage (a ``vlm fit`` checkpoint or state dict, the part's weights under a prefix such
as ``model.vision.``) or a peer format vlm converts: a Hugging Face GPT-2 directory or weights file, recognised by
its keys, for a vlm decoder. :func:`read_part` reads it once, converts it where it must, and checks every key and
shape against the part, so a task only copies the result in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor, nn

from vlm.formats.build import CheckpointError, check_weights
from vlm.formats.checkpoint import current_weight_name
from vlm.interop.hf_gpt2 import check_gpt2_config, gpt2_decoder_state_dict, is_gpt2_state_dict, read_gpt2_checkpoint
from vlm.interop.weights import ConversionError, WeightsSourceError, sub_state_dict

log = logging.getLogger("vlm.interop")


def read_part(source: str | Path, prefix: str, part: nn.Module, name: str) -> dict[str, Tensor]:
    """The state dict of ``part`` (named ``name`` in messages: "vision", "decoder") in ``source``: the entries under
    ``prefix``, or a GPT-2 checkpoint converted (prefix unused). Entries the part does not have are ignored with a
    warning (e.g. the text tower of a CLIP checkpoint).

    Raises:
        WeightsSourceError: the file is missing or unreadable, or its weights do not fit ``part`` (the message says
            which key and shapes, and what the user can do).
    """
    expected = part.state_dict()
    try:
        state, hf_config = read_gpt2_checkpoint(source)
        if is_gpt2_state_dict(state) and not is_gpt2_state_dict(expected):  # a Hugging Face GPT-2: its own keys
            state, prefix = gpt2_decoder_state_dict(state, str(source)), ""
            if hf_config is not None:
                check_gpt2_config(hf_config, part, str(source))
    except ConversionError as e:
        raise WeightsSourceError(f"cannot read the {name} weights ({name}_weights={str(source)!r}): {e}. Train that "
                                 f"stage first (see the config's header) or point {name}_weights elsewhere.") from None
    prefix = current_weight_name(prefix)  # an earlier vlm's model.visual. names the same tower
    weights = sub_state_dict(state, prefix)
    extra = [k for k in weights if k not in expected]
    try:
        check_weights(expected, {k: tuple(v.shape) for k, v in weights.items() if k in expected}, str(source),
                      f"the {name} in the config (prefix {prefix!r})")
    except CheckpointError as e:
        raise WeightsSourceError(f"{e}; the {name}'s architecture must equal the one that was trained") from None
    if extra:
        log.warning("%s: ignoring %d %s weights the model does not have, e.g. %s", source, len(extra), name, extra[0])
    return {k: weights[k] for k in expected}


__all__ = ["read_part"]
