"""Pure ``nn.Module`` models: no Lightning, no I/O, no environment variables (CPU speed-ups: :mod:`vlm.kernels`)."""

from vlm.models.clip import CLIP
from vlm.models.decoder import DecoderLM
from vlm.models.flamingo import Flamingo
from vlm.models.hf_decoder import HFCausalLM
from vlm.models.hf_text import HFTextEncoder
from vlm.models.perceiver import PerceiverResampler
from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer

__all__ = [
    "CLIP",
    "DecoderLM",
    "Flamingo",
    "HFCausalLM",
    "HFTextEncoder",
    "PerceiverResampler",
    "TextTransformer",
    "VisionTransformer",
]
