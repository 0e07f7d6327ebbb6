"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Images are cut into non-overlapping patches by a strided convolution, a class token may be prepended, learned
absolute position embeddings are added (resampled bicubically when the input size differs from the size they were
trained for), and pre-norm transformer blocks follow. ``forward_tokens`` returns every token (normalised),
``intermediate_tokens`` the tokens of an earlier block (not normalised), ``forward`` the pooled image embedding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.models.layers import Block, checkpoint_blocks, init_weights_trunc_normal


def _check_grid(images: Tensor, patch_size: int) -> None:
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")


class PatchEmbed(nn.Module):
    """Splits an image into ``patch_size`` squares and projects each to ``dim`` with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_grid(x, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (b, d, gh, gw) -> (b, gh*gw, d)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW tensor (eps 1e-6): timm's ``LayerNorm2d``, same
    parameters and output (tests/test_vit.py compares them). Written here because importing timm imports
    torchvision and ``torch._dynamo``, seconds of start-up for every script that loads a conv-stem model."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """A convolutional stem in place of the patchify convolution (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better").

    ``log2(patch_size)`` stride-2 3x3 convolutions (channels doubling up to ``dim``), each normalised and rectified,
    then a 1x1 projection: the same token grid as :class:`PatchEmbed` for about the cost of one more block, but
    local edge and corner features come from overlapping 3x3 filters instead of one linear map per patch, which
    makes ViTs learn shape much sooner. A per-pixel LayerNorm over channels rather than the paper's BatchNorm keeps
    every token a function of its own neighbourhood of its own image (so micro-batch accumulation and per-rank batch
    sizes change nothing).
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}")
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = max(dim // 2 ** (stages - 1 - i), 8)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), ChannelNorm(c_out), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        _check_grid(x, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (b, d, gh, gw) -> (b, gh*gw, d)


def resample_pos_embed(pos: Tensor, new_grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Bicubically resamples a (1, prefix + gh*gw, d) position embedding to a new patch grid.

    The class-token position (the first ``num_prefix`` rows) is kept as is; only the spatial grid is resampled.
    """
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(round(grid.shape[1] ** 0.5))
    if (old, old) == tuple(new_grid):
        return pos
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()  # (1, d, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """Patch-embedding Vision Transformer.

    Args:
        image_size: training image size (square); the position embedding is laid out for this grid.
        patch_size: side of a square patch in pixels.
        in_chans: input channels.
        width: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to ``width``.
        qkv_bias: bias on the attention input projections.
        class_token: prepend a learned class token.
        pool: ``token`` (the class token) or ``avg`` (mean of the patch tokens).
        pre_norm: LayerNorm after the position embedding, before the blocks (OpenAI CLIP's ``ln_pre``).
        fc_norm: apply the final LayerNorm after pooling instead of to every token (timm's default for ``avg``);
            ``None`` picks it from ``pool``.
        patch_bias: bias on the patch-embedding convolution (OpenAI CLIP has none).
        act: MLP activation (``gelu``, ``quick_gelu``, ...).
        norm_eps: LayerNorm epsilon.
        layer_scale: initial LayerScale value, or ``None``.
        drop_path: stochastic depth rate, increased linearly over the blocks up to this value.
        patch_dropout: fraction of patch tokens randomly dropped during training (FLIP, Li et al. 2023).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        stem: ``patch`` (one strided convolution, as in the paper and timm) or ``conv`` (:class:`ConvStem`, which
            trains faster from scratch on small data; not loadable into timm).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        pool: Literal["token", "avg"] = "token",
        pre_norm: bool = False,
        fc_norm: bool | None = None,
        patch_bias: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        patch_dropout: float = 0.0,
        grad_checkpointing: bool = False,
        stem: Literal["patch", "conv"] = "patch",
    ) -> None:
        super().__init__()
        if pool == "token" and not class_token:
            raise ValueError("pool='token' needs class_token=True")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.pool = pool
        self.patch_dropout = patch_dropout
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens = 1 if class_token else 0
        grid = image_size // patch_size

        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.stem = stem
        if stem == "conv":
            self.patch_embed = ConvStem(patch_size, in_chans, width)
        else:
            self.patch_embed = PatchEmbed(patch_size, in_chans, width, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid * grid, width))
        self.norm_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, act=act, norm_eps=norm_eps,
                  layer_scale=layer_scale, drop_path=rate)
            for rate in rates
        )
        use_fc_norm = pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(width, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(width, eps=norm_eps) if use_fc_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights_trunc_normal)

    def _drop_patches(self, x: Tensor) -> Tensor:
        """Keeps a random subset of patch tokens per sample (the prefix tokens always stay)."""
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - self.patch_dropout)))
        idx = torch.rand(b, n, device=x.device).topk(keep, dim=1).indices  # (b, keep)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([prefix, patches], dim=1)

    def _embed(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> the blocks' input tokens (b, prefix + patches, width)."""
        x = self.patch_embed(images)  # (b, n, d)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        pos = resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + pos
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)
        return self.norm_pre(x)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> tokens (b, prefix + patches, width) after every block and the final norm."""
        x = checkpoint_blocks(self.blocks, self._embed(images), self.grad_checkpointing)
        return self.norm(x)

    def intermediate_tokens(self, images: Tensor, skip_last_blocks: int) -> Tensor:
        """Images (b, c, h, w) -> tokens (b, prefix + patches, width) after all but the last ``skip_last_blocks``
        blocks, not normalised: a Hugging Face ``hidden_states[-1 - skip_last_blocks]``, e.g. the penultimate
        layer (``skip_last_blocks=1``) a captioner reads."""
        if not 0 <= skip_last_blocks < len(self.blocks):
            raise ValueError(f"skip_last_blocks must be in [0, {len(self.blocks)}), got {skip_last_blocks}")
        blocks = self.blocks[: len(self.blocks) - skip_last_blocks]
        return checkpoint_blocks(blocks, self._embed(images), self.grad_checkpointing)

    def pool_tokens(self, x: Tensor) -> Tensor:
        """Tokens from :meth:`forward_tokens` (b, prefix + patches, width) -> pooled embedding (b, width)."""
        pooled = x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.fc_norm(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """Images (b, c, h, w) -> pooled embedding (b, width)."""
        return self.pool_tokens(self.forward_tokens(images))

    def lock(self, unlocked_blocks: int = 0) -> list[nn.Module]:
        """Freezes the tower (LiT, Zhai et al. 2022) except its last ``unlocked_blocks`` blocks and the final norms,
        as open_clip's ``lock(unlocked_groups)`` does; returns the frozen modules (a task keeps them in eval mode)."""
        if unlocked_blocks < 0:
            raise ValueError(f"unlocked_blocks must be >= 0, got {unlocked_blocks}")
        if unlocked_blocks == 0:
            frozen: list[nn.Module] = [self]
        else:
            kept = len(self.blocks) - min(unlocked_blocks, len(self.blocks))
            keep = list(self.blocks[kept:]) + [self.norm, self.fc_norm]
            frozen = [m for m in self.children() if all(m is not k for k in keep) and m is not self.blocks]
            frozen += list(self.blocks[:kept])
            for p in (self.pos_embed, self.cls_token):
                if p is not None:
                    p.requires_grad_(False)
        for m in frozen:
            m.requires_grad_(False)
        return frozen
