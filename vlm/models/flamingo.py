"""Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning").

A frozen vision encoder and a frozen decoder language model are bridged by two trained parts:

- a :class:`~vlm.models.perceiver.PerceiverResampler` turns each image's patch tokens into a few latents;
- :class:`GatedCrossAttentionBlock` s, inserted before every ``cross_attn_every``-th decoder layer, let text tokens
  attend to those latents. Their tanh gates start at 0, so before training the model is exactly the frozen
  language model.

Text and images interleave: ``<image>`` marks where an image sits in the text and ``<|endofchunk|>`` ends the text
that belongs to it. Each text token attends only to the latents of the most recent ``<image>`` at or before it
(``media_attend="latest"``, the paper's choice; ``"all"`` lets it see every preceding image); tokens before the
first image see no image and get no cross-attention output at all.

The gated blocks are inserted with forward pre-hooks on the decoder's own layers rather than by rebuilding the
decoder, so any decoder that exposes its ``layers`` works (:class:`~vlm.models.decoder.DecoderLM` or a Hugging Face
model through :class:`~vlm.models.hf_decoder.HFCausalLM`) and its state-dict keys stay those of the stand-alone
model. The visual context of the current call is held in ``self._context`` while the decoder runs (and, while
autograd records, until the next call: activation checkpointing replays the layers, hooks included, in the
backward pass).

The new tokens (``<image>``, ``<|endofchunk|>``, ``<pad>``) get ids ``decoder.vocab_size + 0, 1, 2`` and their own
small embedding, so the frozen decoder's embedding matrix is never touched and only these rows train.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlm.models.layers import MLP, Attention
from vlm.models.perceiver import PerceiverResampler
from vlm.models.protocols import CausalDecoder

NUM_NEW_TOKENS = 3  # <image>, <|endofchunk|>, <pad>


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's tanh-gated cross-attention dense block (Alayrac et al. 2022, "Flamingo", section 2.2).

    Text tokens attend to visual tokens, then pass through a feed-forward; each residual branch is scaled by
    ``tanh(gate)``. The gates start at exactly 0, so at initialisation the block is the identity and the frozen
    language model behaves exactly as it did before the visual pathway was inserted.

    Args:
        dim: width of the text stream (the language model's hidden size).
        media_dim: width of the visual tokens (the Perceiver Resampler's output width).
        num_heads: attention heads.
        mlp_ratio: hidden width of the feed-forward relative to ``dim``.
        act: feed-forward activation name.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        media_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, context_dim=media_dim, qkv_bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: identity at init
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act=act)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: Tensor, media: Tensor | None, media_mask: Tensor, media_kv: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Cross-attends text ``x`` (b, n, dim) to ``media`` (b, m, media_dim).

        Args:
            x: text hidden states (b, n, dim).
            media: visual tokens of all images of each sample, concatenated (b, m, media_dim); may be ``None``
                when ``media_kv`` is given.
            media_mask: boolean (b, n, m): which visual tokens each text position may see. A row with no True
                (a token before any image) gets a zero cross-attention output rather than a softmax over nothing.
            media_kv: ``self.attn.project_context(media)`` computed once, for decoding many steps against the
                same images.
        """
        sees_any = media_mask.any(dim=-1, keepdim=True)  # (b, n, 1)
        # SDPA with an all-False row yields NaN; let such rows attend to everything, then zero their output.
        safe_mask = media_mask | ~sees_any  # (b, n, m), given to SDPA as (b, 1, n, m)
        a = self.attn(self.norm1(x), context=media, attn_mask=safe_mask.unsqueeze(1), context_kv=media_kv)
        a = a * sees_any.to(a.dtype)
        x = x + torch.tanh(self.attn_gate) * a
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.norm2(x))


@dataclass
class _Context:
    """What the gated blocks read while the decoder runs."""

    media: Tensor  # (b, T*L, d) latents of every image of each sample, in order
    mask: Tensor  # (b, n, T*L) which latents each text token may attend to
    media_kv: list[tuple[Tensor, Tensor]] | None  # per gated block, keys/values of ``media`` computed once


@dataclass
class FlamingoState:
    """Generation state: the images' latents (computed once), the decoder cache and images seen so far."""

    media: Tensor  # (b, T*L, d)
    media_kv: list[tuple[Tensor, Tensor]]
    cache: Any | None  # the decoder's cache; None: every step gets the whole sequence
    images_seen: Tensor  # (b,) number of <image> tokens already in the cache


class Flamingo(nn.Module):
    """Frozen vision encoder + Perceiver Resampler + frozen decoder with gated cross-attention.

    Args:
        vision: image encoder with ``forward_tokens(images) -> (b, n, width)`` and a ``width`` attribute (e.g. the
            ViT of a trained CLIP).
        decoder: a causal language model (:class:`~vlm.models.protocols.CausalDecoder`: vlm's
            :class:`~vlm.models.decoder.DecoderLM`, a Hugging Face model through
            :class:`~vlm.models.hf_decoder.HFCausalLM`, or a subclass of your own).
        cross_attn_every: a gated cross-attention block goes before decoder layers 0, k, 2k, ...
        cross_attn_heads: heads of the gated cross-attention (must divide the decoder's width).
        cross_attn_mlp_ratio: feed-forward width of the gated blocks relative to the decoder's width.
        num_latents: visual tokens per image after resampling (Flamingo: 64).
        resampler_depth: perceiver layers.
        resampler_heads: perceiver attention heads (must divide the vision width).
        max_frames: most frames per media item (video), i.e. number of time embeddings.
        media_attend: ``latest``: a text token sees only the image of the last ``<image>`` before it; ``all``:
            every image before it.
        visual_layer: which of the tower's token layers the resampler reads: -1, its normalised output
            (Flamingo's choice), -2 the output of the block before the last (LLaVA's choice), and so on (other
            than -1, the tower must have ``intermediate_tokens(images, skip_last_blocks)``, as vlm's ViT does). A
            CLIP loss that reads only the class token never trains the last block's patch outputs.
    """

    def __init__(
        self,
        vision: nn.Module,
        decoder: CausalDecoder,
        cross_attn_every: int = 1,
        cross_attn_heads: int = 8,
        cross_attn_mlp_ratio: float = 4.0,
        num_latents: int = 64,
        resampler_depth: int = 6,
        resampler_heads: int = 8,
        max_frames: int = 8,
        media_attend: Literal["latest", "all"] = "latest",
        visual_layer: int = -1,
    ) -> None:
        super().__init__()
        if media_attend not in ("latest", "all"):
            raise ValueError(f"media_attend must be 'latest' or 'all', got {media_attend!r}")
        depth = len(getattr(vision, "blocks", ()))
        if visual_layer >= 0 or (visual_layer < -1 and -visual_layer > depth):
            raise ValueError(f"visual_layer counts from the last layer (-1, -2, ...) of the tower's {depth} blocks, "
                             f"got {visual_layer}")
        self.visual_layer = visual_layer
        if cross_attn_every < 1:
            raise ValueError(f"cross_attn_every must be >= 1, got {cross_attn_every}")
        self.vision = vision
        self.decoder = decoder
        self.media_attend = media_attend
        self.resampler = PerceiverResampler(vision.width, resampler_depth, resampler_heads, num_latents, max_frames)
        width = decoder.width
        self.cross_attn_layers = [i for i in range(len(decoder.layers)) if i % cross_attn_every == 0]
        self.cross_attn = nn.ModuleList(
            GatedCrossAttentionBlock(dim=width, media_dim=vision.width, num_heads=cross_attn_heads,
                                     mlp_ratio=cross_attn_mlp_ratio)
            for _ in self.cross_attn_layers
        )
        for j, i in enumerate(self.cross_attn_layers):
            # A bound method in a partial: deepcopy re-targets it to the copy's own blocks.
            decoder.layers[i].register_forward_pre_hook(functools.partial(self._cross_attend, j), with_kwargs=True)
        # New tokens: rows of their own, in and out, initialised to the mean of the decoder's rows, so the frozen
        # layers see inputs of the usual scale and the new tokens start as likely as an average token.
        self.new_token_embedding = nn.Parameter(torch.zeros(NUM_NEW_TOKENS, decoder.embed_dim))
        self.new_token_unembedding = nn.Parameter(torch.zeros(NUM_NEW_TOKENS, decoder.embed_dim))
        self._context: _Context | None = None
        self.init_new_tokens()

    # ------------------------------------------------------------------------------------------ vocabulary
    @property
    def image_token_id(self) -> int:
        return self.decoder.vocab_size

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.decoder.vocab_size + 1

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size + NUM_NEW_TOKENS

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    @torch.no_grad()
    def init_new_tokens(self, token_ids: Tensor | None = None) -> None:
        """Sets the new rows to the mean input / output row of the decoder (call again after loading weights).

        Args:
            token_ids: the decoder's rows to average (e.g. a closed vocabulary's); default: all of them.
        """
        device = self.new_token_embedding.device
        if token_ids is None:
            token_ids = torch.arange(self.decoder.vocab_size, device=device)
        total = torch.zeros(self.new_token_embedding.shape[1], device=device)
        for chunk in token_ids.split(8192):  # in chunks: a large vocabulary's embeddings need not all be copied
            total += self.decoder.embed_tokens(chunk.to(device)).float().sum(dim=0)
        self.new_token_embedding.copy_((total / len(token_ids)).expand_as(self.new_token_embedding))
        out_mean = self.decoder.unembedding_weight[token_ids].float().mean(dim=0)
        self.new_token_unembedding.copy_(out_mean.expand_as(self.new_token_unembedding))

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids (b, n), new tokens included -> embeddings (b, n, width)."""
        vocab = self.decoder.vocab_size
        is_new = input_ids >= vocab
        old = self.decoder.embed_tokens(input_ids.masked_fill(is_new, 0))
        new = self.new_token_embedding[(input_ids - vocab).clamp(min=0)].to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)

    def unembed(self, hidden: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """Hidden states (..., width) -> logits (..., vocab_size + 3), or only those of ``token_ids`` (sorted)."""
        vocab = self.decoder.vocab_size
        if token_ids is None:
            logits = self.decoder.unembed(hidden)
            new_rows = self.new_token_unembedding
        else:
            is_new = token_ids >= vocab  # sorted ids: the decoder's first, then the new ones
            logits = self.decoder.unembed(hidden, token_ids[~is_new])
            new_rows = self.new_token_unembedding[token_ids[is_new] - vocab]
        extra = hidden @ new_rows.to(hidden.dtype).T
        return torch.cat([logits, extra.to(logits.dtype)], dim=-1)

    # ------------------------------------------------------------------------------------------------ media
    def encode_media(self, images: Tensor) -> Tensor:
        """Images -> resampled latents (b, T, num_latents, vision.width).

        ``images`` is (b, 3, H, W) for one image per sample, (b, T, 3, H, W) for T images, or (b, T, F, 3, H, W)
        for T videos of F frames.
        """
        if images.ndim == 4:
            images = images[:, None, None]
        elif images.ndim == 5:
            images = images[:, :, None]
        elif images.ndim != 6:
            raise ValueError(f"images must have 4, 5 or 6 dimensions, got shape {tuple(images.shape)}")
        b, t, f = images.shape[:3]
        frames = images.flatten(0, 2)
        if self.visual_layer == -1:  # any tower with forward_tokens(images) serves the default
            tokens = self.vision.forward_tokens(frames)  # (b*T*F, n, dv)
        else:
            tokens = self.vision.intermediate_tokens(frames, skip_last_blocks=-1 - self.visual_layer)
        tokens = tokens.view(b, t, f, *tokens.shape[1:])
        return self.resampler(tokens)

    def media_mask(self, input_ids: Tensor, num_media: int, images_before: Tensor | None = None) -> Tensor:
        """Which latents each token may attend to: boolean (b, n, num_media * num_latents).

        Args:
            input_ids: (b, n) token ids.
            num_media: images per sample (T).
            images_before: (b,) ``<image>`` tokens that precede ``input_ids`` (earlier, cached positions).
        """
        # 1-based index of the latest image at or before each token (the <image> token sees its own image, so
        # the first caption word is predicted from it); 0 = no image yet.
        text_time = (input_ids == self.image_token_id).long().cumsum(dim=1)  # (b, n)
        if images_before is not None:
            text_time = text_time + images_before[:, None]
        latents = self.resampler.num_latents
        media_time = torch.arange(1, num_media + 1, device=input_ids.device).repeat_interleave(latents)  # (T*L,)
        if self.media_attend == "latest":
            return text_time[:, :, None] == media_time  # (b, n, T*L)
        return (media_time <= text_time[:, :, None]) & (text_time[:, :, None] > 0)

    def _cross_attend(self, j: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of decoder layer ``cross_attn_layers[j]``: gated cross-attention before the layer."""
        ctx = self._context
        if ctx is None:  # the decoder is being used on its own
            return None
        x = args[0] if args else kwargs["hidden_states"]
        kv = ctx.media_kv[j] if ctx.media_kv is not None else None
        # Back in the decoder's own dtype: a decoder stored in bf16 keeps its bf16 residual stream (the float32 gates
        # would otherwise promote it, and its norms' bf16 weights would meet float32 inputs).
        x = self.cross_attn[j](x, ctx.media, ctx.mask, kv).to(x.dtype)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    # ---------------------------------------------------------------------------------------------- forward
    def _run_decoder(
        self,
        input_ids: Tensor,
        media: Tensor,
        num_media: int,
        attention_mask: Tensor | None,
        cache: Any | None = None,
        images_before: Tensor | None = None,
        media_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        mask = self.media_mask(input_ids, num_media, images_before)
        self._context = _Context(media, mask, media_kv)
        try:
            return self.decoder.forward_hidden(self.embed(input_ids), attention_mask, cache=cache)
        finally:
            # Kept while a graph is being built: activation checkpointing replays the layers in the backward.
            if not torch.is_grad_enabled():
                self._context = None

    def forward_features(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Images and interleaved token ids (b, n) -> final hidden states (b, n, width), before the unembedding (a
        decoder's own ``forward_hidden`` takes input embeddings instead)."""
        return self.hidden_from_latents(self.encode_media(images), input_ids, attention_mask)

    def hidden_from_latents(self, latents: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """:meth:`forward_features` from the images' resampled latents (b, T, L, d) of :meth:`encode_media`: several
        texts about the same images (e.g. every class name of a query) encode the images once."""
        b, t, n_lat, d = latents.shape
        return self._run_decoder(input_ids, latents.reshape(b, t * n_lat, d), t, attention_mask)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Images and interleaved token ids (b, n) -> next-token logits (b, n, vocab_size + 3)."""
        return self.unembed(self.forward_features(images, input_ids, attention_mask))

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def start_generation(self, images: Tensor, use_cache: bool = True) -> FlamingoState:
        """Encodes the images once and prepares the decoder cache; see :mod:`vlm.generation`."""
        latents = self.encode_media(images)
        b, t, n_lat, d = latents.shape
        media = latents.reshape(b, t * n_lat, d)
        media_kv = [blk.attn.project_context(media) for blk in self.cross_attn]
        cache = self.decoder.new_cache() if use_cache else None
        return FlamingoState(media, media_kv, cache, torch.zeros(b, dtype=torch.long, device=media.device))

    def num_media(self, state: FlamingoState) -> int:
        return state.media.shape[1] // self.resampler.num_latents

    @torch.no_grad()
    def step(
        self, input_ids: Tensor, attention_mask: Tensor | None, state: FlamingoState, token_ids: Tensor | None = None
    ) -> Tensor:
        """Next-token logits (b, vocab), or only those of ``token_ids``, after the new tokens ``input_ids`` (with a
        cache) or the whole sequence (without); ``attention_mask`` covers the whole sequence so far (b, past + n).
        """
        cached = state.cache is not None
        images_before = state.images_seen if cached else None
        hidden = self._run_decoder(
            input_ids, state.media, self.num_media(state), attention_mask, state.cache, images_before, state.media_kv
        )
        if cached:
            state.images_seen = state.images_seen + (input_ids == self.image_token_id).sum(dim=1)
        return self.unembed(hidden[:, -1], token_ids)

    def reorder_state(self, state: FlamingoState, index: Tensor) -> None:
        """Selects (or repeats) batch rows of the state, for beam search."""
        state.media = state.media.index_select(0, index)
        state.media_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in state.media_kv]
        state.images_seen = state.images_seen.index_select(0, index)
        if state.cache is not None:
            self.decoder.reorder_cache(state.cache, index)


__all__ = ["NUM_NEW_TOKENS", "Flamingo", "FlamingoState", "GatedCrossAttentionBlock"]
