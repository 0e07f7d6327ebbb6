"""``scaling``: how cost grows with the size of the input.

One row per point, then the fitted exponent ``cost ~ x ** k`` (least squares in log-log):

- ViT-S/16 forward time against the image side (112..448 px: 49..784 patches; attention is quadratic in the
  patch count, the rest linear, so the exponent against the side lies between 2 and 4) and against batch size;
- text tower and decoder forward time against sequence length (linear layers linear, attention quadratic);
- greedy generation time against the number of new tokens, with the KV cache (must stay linear: exponent
  <= 1.15) and without it (the prefix is recomputed at every step, so it grows about quadratically).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from benchmarks.core import Row, Settings, cpu_kernels, fit_exponent, make_row, median_time

SUITE = "scaling"


def _curve(label: str, unit_x: str, points: dict[int, Callable[[], object]], repeats: int) -> Iterator[Row]:
    xs, ys = [], []
    for x, fn in points.items():
        seconds = median_time(fn, repeats=repeats)
        xs.append(x), ys.append(seconds)
        yield make_row(SUITE, f"{label} {unit_x}={x}", seconds, "s")
    name = f"{label}: exponent of time vs {unit_x} ({xs[0]}..{xs[-1]})"
    yield make_row(SUITE, name, fit_exponent(xs, ys), "exponent")


def vit_rows(settings: Settings) -> Iterator[Row]:
    from vlm.models.vit import VisionTransformer

    torch.manual_seed(0)
    kw = settings.pick(dict(width=384, depth=12, num_heads=6), dict(width=64, depth=2, num_heads=2))
    vit = cpu_kernels(VisionTransformer(image_size=224, patch_size=16, **kw).eval(), settings)
    repeats = min(settings.repeats, 3)

    def forward(batch: int, side: int) -> Callable[[], object]:
        images = torch.randn(batch, 3, side, side)

        def run() -> object:
            with torch.no_grad():
                return vit(images)

        return run

    label = settings.pick("ViT-S/16", "tiny ViT/16")
    sides = settings.pick((112, 160, 224, 320, 448), (32, 64))
    yield from _curve(f"{label} forward b=4", "side", {s: forward(4, s) for s in sides}, repeats)
    batches = settings.pick((1, 2, 4, 8, 16), (1, 2))
    yield from _curve(f"{label} forward 224px", "batch", {b: forward(b, 224 if not settings.quick else 32)
                                                           for b in batches}, repeats)  # fmt: skip


def sequence_rows(settings: Settings) -> Iterator[Row]:
    from vlm.models.decoder import DecoderLM
    from vlm.models.text import TextTransformer

    torch.manual_seed(0)
    lengths = settings.pick((32, 64, 128, 256, 512), (8, 16))
    ctx = max(lengths)
    repeats = min(settings.repeats, 3)
    size = settings.pick(dict(width=512, depth=12, num_heads=8), dict(width=64, depth=2, num_heads=2))
    text = cpu_kernels(TextTransformer(context_length=ctx, **size).eval(), settings)
    dsize = settings.pick(dict(width=768, depth=12, num_heads=12), dict(width=64, depth=2, num_heads=2))
    decoder = DecoderLM(vocab_size=settings.pick(50257, 1000), context_length=ctx, **dsize).eval()
    cpu_kernels(decoder, settings)

    def forward(model: torch.nn.Module, n: int) -> Callable[[], object]:
        ids = torch.randint(0, 1000, (4, n))

        def run() -> object:
            with torch.no_grad():
                return model(ids)

        return run

    label = settings.pick("text tower 12x512", "tiny text tower")
    yield from _curve(f"{label} forward b=4", "tokens", {n: forward(text, n) for n in lengths}, repeats)
    label = settings.pick("DecoderLM GPT-2 small size", "tiny DecoderLM")
    yield from _curve(f"{label} forward b=4", "tokens", {n: forward(decoder, n) for n in lengths}, repeats)


def generation_rows(settings: Settings) -> Iterator[Row]:
    from benchmarks.generate import decoder_greedy_fn, gpt2_size_decoder

    decoder = cpu_kernels(gpt2_size_decoder(settings.quick, context_length=settings.pick(1024, 80)), settings)
    prompt = torch.randint(0, decoder.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    repeats = min(settings.repeats, 3)
    cached = settings.pick((32, 64, 128, 256, 512), (8, 16, 32))
    label = settings.pick("DecoderLM GPT-2 small size", "tiny DecoderLM") + " greedy, 16-token prompt"
    yield from _curve(f"{label}, KV cache", "new tokens",
                      {n: decoder_greedy_fn(decoder, prompt, n, use_cache=True) for n in cached}, repeats)  # fmt: skip
    # Without the cache step t re-runs all 16 + t positions; beyond 128 tokens this takes minutes on a CPU.
    uncached = settings.pick((32, 64, 128), (8, 16, 32))
    yield from _curve(f"{label}, no cache", "new tokens",
                      {n: decoder_greedy_fn(decoder, prompt, n, use_cache=False) for n in uncached}, 1)  # fmt: skip


def run(settings: Settings) -> Iterator[Row]:
    yield from vit_rows(settings)
    yield from sequence_rows(settings)
    yield from generation_rows(settings)
