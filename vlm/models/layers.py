"""Transformer building blocks shared by every model in vlm.

There is exactly one attention implementation here (:class:`Attention`); the ViT, the text tower, the decoder LM,
the Perceiver Resampler and Flamingo's gated cross-attention all call it. It is built on
``torch.nn.functional.scaled_dot_product_attention`` so the fused kernels (flash / memory-efficient) are used
wherever PyTorch has them; inside :func:`record_attention` it computes the softmax weights explicitly and keeps
them (for attention maps), and only there. Every projection is a plain :class:`torch.nn.Linear`; CPU-only speed-ups
are applied from outside by :func:`vlm.kernels.use_cpu_kernels`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by the original OpenAI CLIP weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """Builds an activation by name: ``gelu`` (exact), ``gelu_tanh``, ``quick_gelu`` or ``relu``."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; expected one of gelu, gelu_tanh, quick_gelu, relu")


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer.

    Buffers are preallocated and grown geometrically, so appending one token costs O(1) copies instead of
    re-concatenating the whole prefix at every step.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.length = 0  # number of valid positions (shared by all layers)
        self._written = [0] * num_layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Appends ``k, v`` (b, h, t, d) for ``layer`` and returns all keys and values so far (b, h, n, d)."""
        start = self._written[layer]
        end = start + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self._written[layer] = end
        if layer == len(self.keys) - 1:
            self.length = end
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Selects batch rows (beam search): row i of the cache becomes row ``index[i]``."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention: self-attention (fused QKV), cross-attention (``context_dim``), masks, KV cache.

    Args:
        dim: width of the queries (and of the output).
        num_heads: number of heads; ``dim`` must be divisible by it.
        context_dim: width of the keys/values source for cross-attention; ``None`` for self-attention, which
            uses one fused ``qkv`` projection (one GEMM instead of three).
        qkv_bias: bias on the input projections.
        proj_bias: bias on the output projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads} (a positive count)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.recorded: list[Tensor] | None = None  # set by record_attention: weights are appended while it is a list
        self.detach_recorded = True

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # (b, n, h*d) -> (b, h, n, d)
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of ``context`` (b, m, context_dim), each (b, h, m, d)."""
        if not self.is_cross:
            raise ValueError("project_context is for cross-attention (built with context_dim)")
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        context_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Attends from ``x`` (b, n, dim) to itself or to ``context`` (b, m, context_dim).

        Args:
            x: queries (b, n, dim).
            context: keys/values source for cross-attention (b, m, context_dim).
            attn_mask: boolean (True = may attend) or additive float mask broadcastable to (b, h, n, m).
            is_causal: causal self-attention without materialising a mask (ignored when a mask is given).
            cache: KV cache for incremental decoding (self-attention only); new keys/values are appended.
            layer_idx: which slot of ``cache`` this layer owns.
            context_kv: cross-attention only: ``project_context(context)`` computed earlier, used instead of
                ``context`` (a decoder attending to the same image at every step projects it once).
        """
        b, n, c = x.shape
        if self.is_cross:
            if context_kv is None:
                if context is None:
                    raise ValueError("cross-attention needs a context")
                context_kv = self.project_context(context)
            q = self._heads(self.q(x))  # (b, h, n, d)
            k, v = context_kv  # (b, h, m, d)
        else:
            qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (b, h, n, d)
            if cache is not None:
                past = cache._written[layer_idx]
                k, v = cache.update(layer_idx, k, v)  # (b, h, past + n, d)
                if is_causal and attn_mask is None and past > 0:
                    # Queries sit at positions past..past+n-1: each sees every cached key and its own prefix.
                    # A single new token (the decoding step) sees every key, so it needs no mask at all.
                    if n > 1:
                        attn_mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
                    is_causal = False
        if attn_mask is not None:
            is_causal = False
        dropout_p = self.attn_drop if self.training else 0.0
        if self.recorded is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        else:
            weights = attention_weights(q, k, attn_mask, is_causal)  # (b, h, n, m)
            self.recorded.append(weights.detach() if self.detach_recorded else weights)
            out = F.dropout(weights, dropout_p) @ v  # (b, h, n, d)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """The softmax weights (b, h, n, m) that ``scaled_dot_product_attention`` applies to the values, computed
    explicitly (the fused kernels never materialise them): same scale, same mask conventions."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (b, h, n, m)
    if is_causal:
        n, m = scores.shape[-2:]
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()  # top-left, as SDPA
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.float().softmax(dim=-1).to(q.dtype)


@contextmanager
def record_attention(model: nn.Module, detach: bool = True) -> Iterator[dict[str, list[Tensor]]]:
    """Records the attention weights of every :class:`Attention` inside ``model`` while the block is open.

    ``detach=False`` keeps the weights in the autograd graph (for gradient-weighted maps: ``torch.autograd.grad``
    of a score with respect to them).

    Yields ``{module name: [weights (b, heads, queries, keys), ...]}``, one entry per call in call order (a decoder
    that generates token by token calls each layer once per step). While recording, attention runs the explicit
    softmax path so the weights exist; outside the block the fused kernel runs untouched.

        with record_attention(vit) as maps:
            vit(images)
        last = maps["blocks.11.attn"][0]
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    records: dict[str, list[Tensor]] = {}
    busy = [name or type(model).__name__ for name, module in modules if module.recorded is not None]
    if busy:
        raise RuntimeError(f"attention of {busy[0]} is already being recorded")
    for name, module in modules:
        module.recorded, module.detach_recorded = [], detach
        records[name] = module.recorded
    try:
        yield records
    finally:
        for _, module in modules:
            module.recorded = None


class MLP(nn.Module):
    """Two-layer feed-forward network ``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def hidden(self, x: Tensor) -> Tensor:
        """``act(fc1(x))`` (b, n, hidden): the largest activation of a block (the CPU kernels write it in place)."""
        return self.act(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.hidden(x))))


class LayerScale(nn.Module):
    """Per-channel learnable scaling of a residual branch (CaiT, Touvron et al. 2021)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample during training (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _branch_extras(dim: int, layer_scale: float | None, drop_path: float) -> tuple[nn.Module, nn.Module]:
    ls = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
    dp = DropPath(drop_path) if drop_path > 0 else nn.Identity()
    return ls, dp


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the attention input projections.
        act: MLP activation name (see :func:`make_activation`).
        norm_eps: LayerNorm epsilon (timm uses 1e-6, OpenAI CLIP 1e-5).
        layer_scale: initial LayerScale value, or ``None`` for no LayerScale.
        drop_path: stochastic depth probability.
        attn_drop: attention-weight dropout.
        proj_drop: dropout after the attention and MLP projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1, self.drop_path1 = _branch_extras(dim, layer_scale, drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act=act, drop=proj_drop)
        self.ls2, self.drop_path2 = _branch_extras(dim, layer_scale, drop_path)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        """``x`` (b, n, dim) -> (b, n, dim); masks and cache as in :meth:`Attention.forward`."""
        a = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, cache=cache, layer_idx=layer_idx)
        x = self.add_residual(x, self.drop_path1(self.ls1(a)))
        return self.add_residual(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))

    @staticmethod
    def add_residual(x: Tensor, branch: Tensor) -> Tensor:
        """The residual sum ``x + branch`` (the CPU kernels' block writes it into ``branch`` where it may)."""
        return x + branch


def init_weights_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal init for linear layers, zero bias, unit LayerNorm (the ViT/timm default)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_blocks(blocks: nn.ModuleList, x: Tensor, enabled: bool, **kw) -> Tensor:
    """Runs ``blocks`` in sequence, with activation (gradient) checkpointing per block when ``enabled``."""
    for blk in blocks:
        if enabled and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kw)
        else:
            x = blk(x, **kw)
    return x


__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "KVCache",
    "LayerScale",
    "MLP",
    "QuickGELU",
    "attention_weights",
    "checkpoint_blocks",
    "init_weights_trunc_normal",
    "make_activation",
    "record_attention",
]
