"""What the model sees: attention and similarity maps (:mod:`vlm.explain.maps`), drawn over the image
(:mod:`vlm.explain.render`), and how often they land on the right object (:mod:`vlm.explain.localise`)."""

from vlm.explain.maps import LABEL_METHODS, Explanation, caption_maps, clip_maps

__all__ = ["LABEL_METHODS", "Explanation", "caption_maps", "clip_maps"]
