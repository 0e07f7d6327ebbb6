"""``clip``: our CLIP against open_clip's, same configuration (ViT-B/32) and identical weights.

Image encoding and text encoding (inference; with vlm's default fp32 CPU linear backend, then the other one), and
one full training step: forward of both towers, the contrastive loss, backward and AdamW. Ours runs the project's
own training path (``ContrastiveTask.compute_loss`` and the optimizer its ``configure_optimizers`` builds); open_clip
runs its ``ClipLoss`` and the ``AdamW`` its training script builds, with the same hyper-parameters and the same
decay / no-decay split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from vlm.benchmark.core import Row, Settings, backends, clear_grads, interleaved_medians, make_row, with_backend

SUITE = "clip"

CAPTIONS = (
    "a photo of a small red circle on a grey background",
    "a large blue square left of a small green triangle",
    "two yellow stars",
    "a purple hexagon above an orange cross, with some noise in the background and a lot of words",
)


def open_clip_config(quick: bool) -> dict:
    """open_clip's ``ViT-B-32`` model config (or a tiny one)."""
    if quick:
        vision = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
        return dict(embed_dim=32, vision_cfg=vision, text_cfg=dict(context_length=16, width=64, heads=2, layers=2))
    vision = dict(image_size=224, layers=12, width=768, patch_size=32)
    return dict(embed_dim=512, vision_cfg=vision, text_cfg=dict(context_length=77, width=512, heads=8, layers=12))


def clip_pair(quick: bool, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Our CLIP and open_clip's, holding identical weights (ours converted from open_clip's)."""
    import open_clip

    from vlm.interop.open_clip import from_open_clip

    torch.manual_seed(seed)
    peer = open_clip.CLIP(**open_clip_config(quick))
    return from_open_clip(peer), peer


def clip_inputs(peer: nn.Module, batch: int, text_batch: int) -> tuple[Tensor, Tensor]:
    from vlm.data.tokenizer import CLIPTokenizer

    size = peer.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(text_batch)]
    return images, CLIPTokenizer(peer.context_length)(captions)


def train_steps(ours: nn.Module, peer: nn.Module, images: Tensor, text: Tensor):
    """One training step for each side, as the function to time, plus the first-step losses."""
    from open_clip.loss import ClipLoss

    from vlm.tasks.contrastive import ContrastiveTask
    from vlm.tasks.optim import param_groups

    task = ContrastiveTask(model=ours, lr=1e-5, weight_decay=0.1, warmup_steps=0)
    task_opt = task.configure_optimizers()["optimizer"]
    ours_loss = task.compute_loss(images, text).item()
    peer_loss_fn = ClipLoss()
    groups = param_groups(peer, 0.1)
    peer_opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    with torch.no_grad():
        peer_loss = peer_loss_fn(*peer(images, text)).item()

    def ours_step() -> None:
        task_opt.zero_grad(set_to_none=True)
        task.compute_loss(images, text).backward()
        task_opt.step()
        ours.clamp_logit_scale()

    def peer_step() -> None:
        peer_opt.zero_grad(set_to_none=True)
        peer_loss_fn(*peer(images, text)).backward()
        peer_opt.step()
        with torch.no_grad():
            peer.logit_scale.clamp_(0, math.log(100))

    return ours_step, peer_step, abs(ours_loss - peer_loss)


def run(settings: Settings) -> Iterator[Row]:
    batch, text_batch = settings.pick((16, 64), (2, 4))
    ours, peer = clip_pair(settings.quick)
    images, text = clip_inputs(peer, batch, text_batch)
    ours.eval(), peer.eval()
    label = "ViT-B/32" if not settings.quick else "tiny"
    with torch.no_grad():
        diff_i = (ours.encode_image(images) - peer.encode_image(images, normalize=True)).abs().max().item()
        diff_t = (ours.encode_text(text) - peer.encode_text(text, normalize=True)).abs().max().item()
        yield make_row(SUITE, f"{label} image encode max |ours - open_clip|", diff_i, "abs diff")
        yield make_row(SUITE, f"{label} text encode max |ours - open_clip|", diff_t, "abs diff")
        longest = int((text != 0).sum(dim=1).max())
        for i, backend in enumerate(backends()):  # the default CPU linear backend first, then the other one
            tag = "" if i == 0 else f" VLM_CPU_LINEAR={backend}"
            t = interleaved_medians(
                {"ours": with_backend(lambda: ours.encode_image(images), backend),
                 "peer": lambda: peer.encode_image(images, normalize=True)},
                repeats=settings.repeats,
            )  # fmt: skip
            rate = {k: batch / v for k, v in t.items()}
            yield make_row(SUITE, f"{label} image encode (b={batch}){tag}", rate["ours"], "img/s", rate["peer"])
            t = interleaved_medians(
                {"ours": with_backend(lambda: ours.encode_text(text), backend),
                 "peer": lambda: peer.encode_text(text, normalize=True)},
                repeats=settings.repeats,
            )  # fmt: skip
            name = f"{label} text encode (b={text_batch}, captions of <= {longest} tokens in a {text.shape[1]} context)"
            yield make_row(SUITE, name + tag, text_batch / t["ours"], "texts/s", text_batch / t["peer"])
    ours.train(), peer.train()
    ours_step, peer_step, loss_diff = train_steps(ours, peer, images, text[:batch])
    yield make_row(SUITE, f"{label} train step first loss |ours - open_clip|", loss_diff, "abs diff")
    t = interleaved_medians({"ours": ours_step, "peer": peer_step}, repeats=settings.repeats)
    yield make_row(SUITE, f"{label} train step (b={batch}: fwd, loss, bwd, AdamW)", t["ours"], "s", t["peer"])
    clear_grads(ours), clear_grads(peer)
