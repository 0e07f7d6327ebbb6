"""Pure ``nn.Module`` models: no Lightning, no I/O."""

from vlm.models.clip import CLIP
from vlm.models.text import TextTransformer
from vlm.models.vit import VisionTransformer

__all__ = ["CLIP", "TextTransformer", "VisionTransformer"]
