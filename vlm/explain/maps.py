"""Where a model looks: attention rollout, class-token attention and per-label maps for a CLIP image tower, and one
map per generated word for a Flamingo captioner. Every map is over the image's patch grid (gh, gw).

CLIP (:func:`clip_maps`):

- ``rollout``: attention rollout (Abnar & Zuidema 2020): each block's head-averaged attention plus the identity
  (the residual), rows renormalised, multiplied through the blocks; the pooled token's row over the patches.
- ``class_attention``: the last block's head-averaged attention from the class token (the mean over patch queries
  for an average-pooled tower) to each patch.
- ``labels[label]``: which patches make the image match ``label``. ``relevance`` (the default) is the
  gradient-weighted attention relevance of Chefer et al. 2021 ("Generic Attention-model Explainability"): each
  block's attention times the gradient of the image-text score with respect to it, positive part, head-averaged,
  accumulated through the blocks from the identity. ``similarity`` is the cosine between each patch token, put
  through the pooled path's norm and projection, and the label's text embedding.

Flamingo (:func:`caption_maps`): the caption is generated, then the prompt and caption are run once more with
attention recorded. The map of a caption token is the gated cross-attention of the position that predicted it (the
token before it), averaged over heads and gated blocks, over the latents of the image; carried back to the patches
through the Perceiver Resampler's attention from those latents to the image tokens (averaged over its layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.models.convnet import ConvNet
from vlm.models.layers import record_attention
from vlm.models.vit import VisionTransformer

LABEL_METHODS = ("relevance", "similarity")


@dataclass
class Explanation:
    """Maps over one image's token grid, each a (gh, gw) tensor (attention maps are non-negative; similarity and
    class activation maps are signed)."""

    grid: tuple[int, int]
    maps: dict[str, Tensor] = field(default_factory=dict)  # label-free maps: rollout, class_attention
    labels: dict[str, Tensor] = field(default_factory=dict)  # per label (CLIP)
    scores: dict[str, float] = field(default_factory=dict)  # the image-label cosine similarity, per label
    words: list[tuple[str, Tensor]] = field(default_factory=list)  # per caption token, in order (Flamingo)
    caption: str | None = None

    def to_json(self) -> dict:
        """The raw maps as nested lists (JSON-ready)."""
        out: dict = {"grid": list(self.grid), "maps": {k: v.tolist() for k, v in self.maps.items()}}
        if self.labels:
            out["labels"] = [{"label": k, "score": self.scores.get(k), "map": v.tolist()}
                             for k, v in self.labels.items()]
        if self.caption is not None:
            out["caption"] = self.caption
            out["words"] = [{"token": t, "map": m.tolist()} for t, m in self.words]
        return out


def _tower(model: torch.nn.Module) -> VisionTransformer:
    vit = model.vision
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"attention maps need vlm's VisionTransformer as the image tower, got {type(vit).__name__}")
    return vit


def _token_grid(tower: torch.nn.Module, images: Tensor) -> tuple[tuple[int, int], int]:
    """The image tower's token grid for ``images`` and its number of non-image (prefix) tokens."""
    if isinstance(tower, ConvNet):
        return (tower.grid, tower.grid), 0
    if not isinstance(tower, VisionTransformer):
        raise TypeError(f"maps need vlm's VisionTransformer or ConvNet as the image tower, got {type(tower).__name__}")
    return (images.shape[-2] // tower.patch_size, images.shape[-1] // tower.patch_size), tower.num_prefix_tokens


def _block_maps(vit: VisionTransformer, records: dict[str, list[Tensor]]) -> list[Tensor]:
    """The blocks' attention weights in order, each (b, h, n, n)."""
    return [records[f"blocks.{i}.attn"][-1] for i in range(len(vit.blocks))]


def _pooled_row(vit: VisionTransformer, matrix: Tensor) -> Tensor:
    """The pooled output's row of a token-by-token matrix (b, n, n), over the patches: (b, patches)."""
    p = vit.num_prefix_tokens
    rows = matrix[:, 0] if vit.pool == "token" else matrix[:, p:].mean(dim=1)
    return rows[:, p:]


def rollout(vit: VisionTransformer, attention: list[Tensor]) -> Tensor:
    """Attention rollout over the blocks' weights (each (b, h, n, n)) -> (b, patches)."""
    n = attention[0].shape[-1]
    eye = torch.eye(n, device=attention[0].device)
    joint = eye.expand(attention[0].shape[0], n, n)
    for weights in attention:
        a = weights.mean(dim=1) + eye
        joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
    return _pooled_row(vit, joint)


def relevance(vit: VisionTransformer, attention: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Gradient-weighted attention relevance (Chefer et al. 2021) -> (b, patches)."""
    n = attention[0].shape[-1]
    rel = torch.eye(n, device=attention[0].device).expand(attention[0].shape[0], n, n)
    for weights, grad in zip(attention, grads):
        cam = (grad * weights).clamp(min=0).mean(dim=1)  # (b, n, n)
        rel = rel + cam @ rel
    return _pooled_row(vit, rel)


def _convnet_maps(model: torch.nn.Module, tower: ConvNet, images: Tensor, text_embeddings: Tensor,
                  labels: list[str]) -> list[Explanation]:
    """Class activation maps of a CLIP with a :class:`ConvNet` tower (see the module's docstring)."""
    with torch.no_grad():
        cells = tower.intermediate_tokens(images, 0)  # (b, P, width); the pooled embedding is their mean
        projected = model.vision_proj(cells)  # linear, no bias: the cells' mean is the pooled projection
        norm = projected.mean(dim=1).norm(dim=-1, keepdim=True)  # (b, 1): the unit-length embedding's divisor
        per_cell = projected @ text_embeddings.T / norm.unsqueeze(1)  # (b, P, labels); mean over P = the score
        scores = per_cell.mean(dim=1)
        activation = cells.norm(dim=-1)
    grid = (tower.grid, tower.grid)
    out = []
    for i in range(images.shape[0]):
        exp = Explanation(grid, {"activation": activation[i].view(grid)})
        for j, label in enumerate(labels):
            exp.labels[label] = per_cell[i, :, j].view(grid)
            exp.scores[label] = float(scores[i, j])
        out.append(exp)
    return out


def clip_maps(model: torch.nn.Module, images: Tensor, text_embeddings: Tensor, labels: list[str],
              method: str = "relevance") -> list[Explanation]:
    """Maps of a CLIP model for a batch of preprocessed ``images`` (b, 3, H, W) and the unit-length text embeddings
    (len(labels), d) of ``labels``; one :class:`Explanation` per image."""
    if method not in LABEL_METHODS:
        raise ValueError(f"method must be one of {', '.join(LABEL_METHODS)}, got {method!r}")
    if isinstance(model.vision, ConvNet):
        return _convnet_maps(model, model.vision, images, text_embeddings, labels)
    vit = _tower(model)
    grid = (images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size)
    b, p = images.shape[0], vit.num_prefix_tokens
    with torch.enable_grad(), record_attention(vit, detach=False) as records:
        tokens = vit.forward_tokens(images)
        embedding = F.normalize(model.vision_proj(vit.pool_tokens(tokens)), dim=-1)
        scores = embedding @ text_embeddings.T  # (b, num_labels)
        attention = _block_maps(vit, records)
        per_label = []
        if method == "relevance":
            for j in range(len(labels)):
                grads = torch.autograd.grad(scores[:, j].sum(), attention, retain_graph=True)
                per_label.append(relevance(vit, attention, list(grads)).detach())
        else:
            patches = F.normalize(model.vision_proj(vit.fc_norm(tokens[:, p:])), dim=-1)  # (b, P, d)
            sim = (patches @ text_embeddings.T).detach()  # (b, P, num_labels)
            per_label = [sim[..., j] for j in range(len(labels))]
    attention = [a.detach() for a in attention]
    roll = rollout(vit, attention)
    last = attention[-1].mean(dim=1)  # (b, n, n)
    cls = _pooled_row(vit, last)
    out = []
    for i in range(b):
        exp = Explanation(grid, {"rollout": roll[i].view(grid), "class_attention": cls[i].view(grid)})
        for j, label in enumerate(labels):
            exp.labels[label] = per_label[j][i].view(grid)
            exp.scores[label] = float(scores[i, j].detach())
        out.append(exp)
    return out


def _latent_to_patch(flamingo: torch.nn.Module, records: dict[str, list[Tensor]], num_tokens: int) -> Tensor:
    """The resampler's attention from its latents to the image's tokens, averaged over heads and layers:
    (b, num_latents, num_tokens) for one single-frame image per sample."""
    layers = [records[f"resampler.layers.{i}.attn"][-1] for i in range(len(flamingo.resampler.layers))]
    return torch.stack([a[..., :num_tokens].mean(dim=1) for a in layers]).mean(dim=0)


@torch.no_grad()
def caption_maps(captioner, images: Tensor, caption_ids: list[list[int]], prompt: str,
                 captions: list[str]) -> list[Explanation]:
    """One map per caption token for a batch of single images (b, 3, H, W) captioned ``caption_ids`` after
    ``prompt``; ``captioner`` is a :class:`~vlm.generation.Captioner`."""
    flamingo, tokenizer = captioner.model, captioner.tokenizer
    grid, prefix = _token_grid(flamingo.vision, images)
    prompt_ids = tokenizer.encode_prompts([prompt])["input_ids"][0].tolist()
    blocks = [f"cross_attn.{j}.attn" for j in range(len(flamingo.cross_attn))]
    out = []
    for i, ids in enumerate(caption_ids):
        sequence = torch.tensor([prompt_ids + ids], device=images.device)
        with record_attention(flamingo) as records:
            flamingo(images[i : i + 1], sequence)
        num_tokens = records["resampler.layers.0.attn"][-1].shape[-1] - flamingo.resampler.num_latents
        to_patch = _latent_to_patch(flamingo, records, num_tokens)[0]  # (L, num_tokens)
        cross = torch.stack([records[name][-1][0].mean(dim=0) for name in blocks]).mean(dim=0)  # (n, L)
        exp = Explanation(grid, caption=captions[i])
        for k, token in enumerate(ids):
            row = cross[len(prompt_ids) + k - 1]  # the position that predicted this token
            patch_map = (row @ to_patch)[prefix:]
            exp.words.append((tokenizer.decode([token]), patch_map.view(grid)))
        out.append(exp)
    return out


__all__ = ["Explanation", "LABEL_METHODS", "caption_maps", "clip_maps", "relevance", "rollout"]
