"""Writes the small trained image tower that ``tests/test_pointing.py`` scores attention maps on.

The test suite cannot afford a training run, so it keeps the image side of one: the ViT, the image projection and
the 36 shapes class vectors of a CLIP trained by the shipped config at test sizes (about 250 KB of float16):

    vlm fit --config configs/clip/shapes.yaml --trainer.max_steps 200 --trainer.val_check_interval 200 \\
        --trainer.default_root_dir runs/pointing --model.init_args.model.init_args.vision.init_args.image_size 32 \\
        --model.init_args.model.init_args.vision.init_args.width 64 \\
        --model.init_args.model.init_args.vision.init_args.depth 2 \\
        --model.init_args.model.init_args.text.init_args.width 64 --model.init_args.model.init_args.embed_dim 64 \\
        --model.init_args.lr_scheduler.init_args.warmup_steps 20 --data.init_args.source.init_args.data_dir \\
        data/shapes-4k --data.init_args.source.init_args.num_train 4000 \\
        --data.init_args.source.init_args.num_val 144 --data.init_args.batch_size 64
    python scripts/pointing_fixture.py runs/pointing/checkpoints/last.ckpt tests/data/pointing_clip.safetensors
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import save_file

import vlm
from vlm.data.shapes import CLASSNAMES


def main(checkpoint: str, out: str) -> None:
    clip = vlm.load(checkpoint)
    vit = clip.model.vision
    tensors = {f"vision.{k}": v.half() for k, v in vit.state_dict().items()}
    tensors["vision_proj.weight"] = clip.model.vision_proj.weight.detach().half()
    tensors["classes"] = clip.zero_shot_classifier(list(CLASSNAMES)).half()
    config = {"image_size": vit.image_size, "patch_size": vit.patch_size, "width": vit.width,
              "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads, "stem": vit.stem,
              "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.width}  # fmt: skip
    meta = {"vision": json.dumps(config), "classnames": json.dumps(list(CLASSNAMES)),
            "image_mean": json.dumps(clip.image_mean), "image_std": json.dumps(clip.image_std)}  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata=meta)
    print(f"wrote {out}: {config}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
