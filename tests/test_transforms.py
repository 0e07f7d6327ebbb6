"""The evaluation transforms call torch directly (no torchvision import at start-up); they must give torchvision
``transforms.v2``'s output bit for bit, since training (torchvision) and every model's preprocessing depend on it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from vlm.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_geometry, eval_transform, normalize


def _torchvision_geometry(size: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size)])  # fmt: skip


def _torchvision_normalize(mean, std) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode)


@pytest.mark.parametrize("h, w, size", [(64, 64, 64), (64, 64, 32), (30, 50, 64), (97, 41, 32), (41, 97, 224),
                                        (300, 200, 224), (5, 3, 16), (64, 65, 64)])  # fmt: skip
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_geometry_equals_torchvision_bit_for_bit(h, w, size, mode):
    image = _image(h, w, mode)
    ours, theirs = eval_geometry(size)(image), _torchvision_geometry(size)(image)
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs.as_subclass(torch.Tensor))
    tensor = v2.ToImage()(image).as_subclass(torch.Tensor)  # a uint8 tensor input takes the same path
    assert torch.equal(eval_geometry(size)(tensor), theirs.as_subclass(torch.Tensor))


def test_center_crop_pads_a_smaller_image_as_torchvision_does():
    from vlm.data.transforms import center_crop

    image = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8)
    for size in (4, 7, 9, 10):
        assert torch.equal(center_crop(image, size), v2.CenterCrop(size)(image))


def test_normalize_equals_torchvision_on_images_and_batches():
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 17, 9), (4, 3, 8, 8)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        ours = normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x)
        assert torch.equal(ours, _torchvision_normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x))
    floats = torch.rand(3, 4, 4, generator=gen)  # already float32: only the normalisation
    assert torch.equal(normalize((0.5,) * 3, (0.25,) * 3)(floats), v2.Normalize([0.5] * 3, [0.25] * 3)(floats))
    doubles = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)  # other floats: cast, not rescaled
    reference = _torchvision_normalize((0.5,) * 3, (0.25,) * 3)(doubles)
    assert torch.equal(normalize((0.5,) * 3, (0.25,) * 3)(doubles), reference)
    with pytest.raises(ValueError, match="zero"):
        normalize((0.5,) * 3, (0.2, 0.0, 0.2))


def test_eval_transform_equals_torchvision():
    image = _image(120, 90)
    expected = _torchvision_normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(_torchvision_geometry(64)(image))
    assert torch.equal(eval_transform(64)(image), expected.as_subclass(torch.Tensor))


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_loading_and_classifying_imports_only_what_the_model_needs(tmp_path, stem):
    """`vlm.load` of a CLIP checkpoint and one classification import neither torchvision (its detection models and
    torch._dynamo), timm, Lightning nor transformers: seconds of start-up the model does not need. The conv stem's
    norm and the meta-device build used to pull in timm and torch._dynamo."""
    from conftest import tiny_clip_config

    from vlm.formats import build_task

    config = tiny_clip_config()
    config["init_args"]["model"]["init_args"]["vision"]["init_args"]["stem"] = stem
    task = build_task(config)
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}, path)  # fmt: skip
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    heavy = ("torchvision", "timm", "lightning", "transformers", "torch._dynamo")
    code = (f"import sys, vlm; m = vlm.load({str(path)!r}); m.classify([{str(tmp_path / 'red.png')!r}], ['a', 'b']); "
            f"print(sorted(n for n in {heavy!r} if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
