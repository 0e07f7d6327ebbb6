"""Folder throughput (part of the ``scripts`` suite): embedding a folder of images as ``vlm index`` does, decoding in
worker processes ahead of the model, against open_clip's way, ``encode_image`` over a 2-worker torch ``DataLoader``
with open_clip's own preprocessing, on the same model and weights (ours converted from open_clip's).

Ours is :func:`vlm.index.embed_files` on a ``CLIPPredictor`` with the CPU kernels ``vlm.load`` applies, with the
workers ``vlm index`` picks by default, and with none (decoding in process, as before the workers): the first ratio
is against open_clip, the second what the workers bring. Images are JPEG photos' size (640 x 480, random pixels, so
decoding costs what a real photo's does). Two models: ViT-B/32, whose forward costs ten times a decode (the workers
can save at most that tenth), and a tiny CLIP, where decoding is most of the work; the quick run uses the tiny model
and a few small images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.core import Row, Settings, interleaved_medians, make_row

SUITE = "scripts"


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` random RGB JPEGs of ``size`` (width, height), named in order; their relative names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        names.append(f"{i:05d}.jpg")
    return names


class _OpenClipFiles(torch.utils.data.Dataset):
    """open_clip's evaluation input: the file opened with PIL, converted to RGB, its ``preprocess`` applied."""

    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.preprocess(image.convert("RGB"))


def folder_rows(settings: Settings) -> Iterator[Row]:
    """ViT-B/32 (the forward dominates) and a tiny CLIP (decoding dominates) on photo-sized JPEGs; the quick run: the
    tiny CLIP on a few small images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_jpegs(root, settings.pick(96, 8), settings.pick((640, 480), (48, 40)))
        models = [("CLIP ViT-B/32", False), ("tiny CLIP", True)] if not settings.quick else [("tiny CLIP", True)]
        for label, tiny in models:
            yield from _model_rows(settings, root, names, label, tiny)


def _model_rows(settings: Settings, root: Path, names: list[str], label: str, tiny: bool) -> Iterator[Row]:
    import open_clip

    from benchmarks.clip import clip_pair
    from vlm.data.prefetch import default_workers
    from vlm.data.tokenizer import CLIPTokenizer
    from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from vlm.index import embed_files
    from vlm.inference import CLIPPredictor
    from vlm.kernels import use_cpu_kernels
    from vlm.zero_shot import ZeroShotModel

    ours, peer = clip_pair(tiny)
    ours.eval()
    peer.eval()
    batch = settings.pick(32, 4)
    loaded = ZeroShotModel(ours, CLIPTokenizer(peer.context_length), "openai", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    predictor = CLIPPredictor(loaded, "benchmark", batch_size=batch)
    use_cpu_kernels(predictor.model, "auto")  # as vlm.load applies them
    size = peer.visual.image_size[0]
    preprocess = open_clip.image_transform(size, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    workers = max(1, default_workers(len(names)))

    def ours_run(w: int):
        def run() -> None:
            for _ in embed_files(predictor, root, names, lambda name, why: None, batch, w):
                pass
        return run

    loader = torch.utils.data.DataLoader(_OpenClipFiles([root / n for n in names], preprocess), batch_size=batch,
                                         num_workers=2, prefetch_factor=2)  # fmt: skip

    @torch.no_grad()
    def peer_run() -> None:
        for images in loader:
            peer.encode_image(images, normalize=True)

    times = interleaved_medians({"ours": ours_run(workers), "in process": ours_run(0), "peer": peer_run},
                                settings.pick(max(1, settings.repeats // 2), 1))  # fmt: skip
    rate = {name: len(names) / t for name, t in times.items()}
    what = f"folder of {len(names)} JPEGs, {label} ({size} px), b={batch}"
    yield make_row(SUITE, f"{what}: vlm index path ({workers} decoding worker(s)) vs open_clip encode_image over a "
                          "2-worker DataLoader", rate["ours"], "img/s", rate["peer"])  # fmt: skip
    yield make_row(SUITE, f"{what}: vlm index path, {workers} decoding worker(s) vs decoding in process",
                   rate["ours"], "img/s", rate["in process"])


__all__ = ["folder_rows"]
