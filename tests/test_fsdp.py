"""Fully sharded data parallel training (FSDP2 through ``vlm.tasks.sharding.FSDP2Strategy``) on 2 CPU processes
(gloo), each run a subprocess (``tests/fsdp_train.py``, or ``python -m vlm fit`` for the shipped config).

The same global batch of 8 split over 2 ranks must train like one process holding it. The two runs differ only in
the order of their reductions (each rank sums its half, then the halves are summed; AdamW's update is elementwise
and the same), so they agree to a few units in the last place, not bitwise. These comparisons train in float64,
where that rounding is about 1e-16 and the bound below holds on any CPU; in float32 a gradient element near zero
can round to the other sign on one CPU and not another, and AdamW's normalised step turns that into a whole
learning-rate step. A resumed sharded run replays the very same reductions, so it must match bit for bit.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FP32_EPS, TINY_FLAMINGO, build_trainable, run_job, tiny_clip_config
from resume_helpers import ROOT, subprocess_env

SCRIPT = Path(__file__).with_name("fsdp_train.py")
STEPS = 6
# Float64 sums of the same terms in two orders differ by a few ulps (2**-52, about 2.2e-16) of magnitudes about 1,
# say 1e-15. AdamW divides each gradient by its root mean square, which is at least its eps (1e-8 or more here), so
# at lr 1e-2 that difference moves an update by at most 1e-2 * 1e-15 / 1e-8 = 1e-9 per step, 6e-9 over 6 steps:
# hence 1e-8, on weights and losses alike, while one sample or one step out of place moves the loss by 1e-3 or more.
FLOAT64_TOL = 1e-8
# The losses themselves are float32 numbers (vlm.losses takes the language-model cross-entropy in float32, float64
# logits too): a mean of about 40 per-token terms, grouped otherwise across the ranks, so within one ulp per term.
LOSS_RTOL = 64 * FP32_EPS


def train(out: Path, *args: str) -> Path:
    run_job([[sys.executable, str(SCRIPT), str(out), *args]], env=subprocess_env())
    return out


def curve(out: Path, ranks: int = 2) -> list[float]:
    """The global batch's loss at every step: the mean of the ranks' losses (equal token counts per rank)."""
    per_rank = [json.loads((out / f"losses_rank{r}.json").read_text()) for r in range(ranks)]
    return [sum(r[k] for r in per_rank) / ranks for k in per_rank[0]]


def info(out: Path, rank: int) -> dict:
    return json.loads((out / f"run_rank{rank}.json").read_text())


def assert_same_training(sharded: Path, single: Path) -> None:
    """Two float64 runs (``--dtype float64``) trained alike: weights within :data:`FLOAT64_TOL`, losses within that
    and their float32 rounding."""
    torch.testing.assert_close(curve(sharded), curve(single, ranks=1), rtol=LOSS_RTOL, atol=FLOAT64_TOL)
    full, ref = torch.load(sharded / "weights.pt"), torch.load(single / "weights.pt")
    assert set(full) == set(ref)
    for name, value in ref.items():
        assert value.dtype == full[name].dtype and (value.dtype == torch.float64 or not value.is_floating_point()), name
        torch.testing.assert_close(full[name], value, rtol=0, atol=FLOAT64_TOL, msg=name)


# ------------------------------------------------------------------------------------------------ the policy
def test_the_wrap_policy_is_read_off_the_model(hf_lm_dirs):
    from vlm.models.flamingo import GatedCrossAttentionBlock
    from vlm.models.layers import Block
    from vlm.models.perceiver import PerceiverLayer
    from vlm.tasks.sharding import layer_classes, layers_to_checkpoint

    clip = build_trainable(tiny_clip_config())
    assert layer_classes(clip.model) == {Block}
    assert layers_to_checkpoint(clip.model, "frozen") == []  # CLIP trains everything
    assert len(layers_to_checkpoint(clip.model, "all")) == 4  # 2 image + 2 text blocks

    flamingo = build_trainable(TINY_FLAMINGO)
    assert layer_classes(flamingo.model) == {Block, GatedCrossAttentionBlock, PerceiverLayer}
    frozen = layers_to_checkpoint(flamingo.model, "frozen")
    assert frozen == [*flamingo.model.vision.blocks, *flamingo.model.decoder.layers]
    for name, layer in (("gpt2", "GPT2Block"), ("opt", "OPTDecoderLayer"), ("llama", "LlamaDecoderLayer")):
        cfg = copy.deepcopy(TINY_FLAMINGO)
        cfg["init_args"]["model"]["init_args"]["decoder"] = {"class_path": "vlm.models.hf_decoder.HFCausalLM",
                                                             "init_args": {"name_or_path": hf_lm_dirs[name]}}
        cfg["init_args"]["tokenizer"] = {"class_path": "vlm.data.gpt2_tokenizer.CausalLMTokenizer",
                                         "init_args": {"name_or_path": hf_lm_dirs[name]}}
        model = build_trainable(cfg).model
        classes = layer_classes(model)
        assert {c.__name__ for c in classes} == {"Block", "GatedCrossAttentionBlock", "PerceiverLayer", layer}, name
        decoder_layers = [m for m in layers_to_checkpoint(model, "frozen") if type(m).__name__ == layer]
        assert decoder_layers == list(model.decoder.layers)  # the decoder's own layers, each once
    with pytest.raises(ValueError, match="activation_checkpointing must be one of none, frozen, all"):
        layers_to_checkpoint(model, "some")


# ------------------------------------------------------------------------------------------------ Flamingo
@pytest.fixture(scope="module")
def flamingo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_flamingo")
    common = ["--task", "flamingo", "--max-steps", str(STEPS), "--dtype", "float64"]
    fsdp = [*common, "--strategy", "fsdp", "--devices", "2", "--checkpointing", "frozen"]
    return {
        "single": train(tmp / "single", *common, "--strategy", "single"),
        # With a sharded checkpoint after step 3 (writing it changes nothing in the run).
        "fsdp": train(tmp / "fsdp", *fsdp, "--ckpt-every", "3"),
    }


def test_fsdp_flamingo_trains_like_one_process_on_the_global_batch(flamingo):
    run = info(flamingo["fsdp"], 0)
    # One unit per layer plus the root; the frozen decoder's (and the frozen tower's) layers recompute activations.
    assert run["fsdp_units"] == ["FSDPBlock", "FSDPBlock", "FSDPFlamingo", "FSDPGatedCrossAttentionBlock",
                                 "FSDPPerceiverLayer"]
    assert run["checkpointed"] == ["FSDPBlock", "FSDPBlock"]  # the tower's block and the decoder's, each sharded
    losses = curve(flamingo["fsdp"])
    assert losses[-1] < losses[0] - 0.1  # it learns
    assert_same_training(flamingo["fsdp"], flamingo["single"])


def test_fsdp_flamingo_optimizer_state_is_sharded_and_only_for_trainable_parameters(flamingo):
    ranks = [info(flamingo["fsdp"], r) for r in (0, 1)]
    single = info(flamingo["single"], 0)
    for run in ranks:
        # The frozen tower and decoder have no optimizer state at all: only the bridge's parameters do.
        assert run["params_in_optimizer"] == run["with_state"] == run["trainable"] == single["trainable"]
        assert run["trainable_elements"] == single["trainable_elements"] == single["local_exp_avg_elements"]
        assert run["local_exp_avg_elements"] < 0.6 * single["local_exp_avg_elements"]  # each rank: about half
    assert sum(r["local_exp_avg_elements"] for r in ranks) == single["local_exp_avg_elements"]


def test_fsdp_sharded_checkpoint_resumes_bit_for_bit(flamingo, tmp_path):
    """Resumed from the sharded checkpoint of step 3 (of 6: the schedule is the same), the run replays steps 4-6
    exactly as the uninterrupted one."""
    step3 = flamingo["fsdp"] / "checkpoints" / "step=3.ckpt"
    assert step3.is_dir() and {p.name for p in step3.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    resumed = train(tmp_path / "resumed", "--task", "flamingo", "--max-steps", str(STEPS), "--dtype", "float64",
                    "--strategy", "fsdp", "--devices", "2", "--checkpointing", "frozen", "--resume", str(step3))
    for rank in (0, 1):
        full = json.loads((flamingo["fsdp"] / f"losses_rank{rank}.json").read_text())
        after = json.loads((resumed / f"losses_rank{rank}.json").read_text())
        assert list(after) == ["4", "5", "6"]
        assert after == {k: full[k] for k in after}  # bit for bit
    ref, out = torch.load(flamingo["fsdp"] / "weights.pt"), torch.load(resumed / "weights.pt")
    assert set(ref) == set(out) and all(torch.equal(ref[k], out[k]) for k in ref)


# ---------------------------------------------------------------------------------------------------- CLIP
def test_fsdp_clip_trains_like_one_process_on_the_global_batch(tmp_path):
    common = ["--task", "clip", "--max-steps", str(STEPS), "--dtype", "float64"]
    single = train(tmp_path / "single", *common, "--strategy", "single")
    fsdp = train(tmp_path / "fsdp", *common, "--strategy", "fsdp", "--devices", "2")
    assert info(fsdp, 0)["fsdp_units"] == ["FSDPBlock"] * 4 + ["FSDPCLIP"]
    assert info(fsdp, 0)["with_state"] == info(single, 0)["with_state"]  # the replicated temperature included
    assert_same_training(fsdp, single)


# ------------------------------------------------------------------------------------- the shipped config
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlm.data import shapes as S

    path = tmp_path_factory.mktemp("fsdp_shapes") / "shapes"
    S.generate_shapes(path, train=16, val=4, seed=0, image_size=32, processes=1)
    return path


def args_dtype(cfg: dict) -> str:
    return cfg["model"]["init_args"]["model"]["init_args"]["decoder"]["init_args"]["dtype"]


def run_hf_lm_config(hf_dir: str, shapes: Path, root: Path, accelerator: str, devices: int) -> None:
    """configs/flamingo/hf_lm.yaml as shipped (FSDP2, activation checkpointing of the frozen decoder, bf16-mixed with
    the decoder stored in bf16, gradient clipping, a full last.ckpt) with its hub parts swapped for a tiny local
    decoder and tower: two steps and a validation with generation through ``vlm fit``, then the checkpoint loads
    through vlm's checked loader with the frozen decoder unchanged."""
    from transformers import AutoModelForCausalLM

    from vlm.formats import load_task

    cfg = yaml.safe_load((ROOT / "configs/flamingo/hf_lm.yaml").read_text())
    trainer = cfg["trainer"]
    assert trainer["precision"] == "bf16-mixed" and args_dtype(cfg) == "bfloat16"  # kept: CPU autocast has bf16
    # Validation (with generation) runs twice: Lightning's sanity check before any training step, and after step 2.
    trainer.update(accelerator=accelerator, devices=devices, max_steps=2, val_check_interval=2,
                   limit_val_batches=1, default_root_dir=str(root), logger=False,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "LearningRateMonitor" not in c["class_path"]]
    args = cfg["model"]["init_args"]
    model = args["model"]["init_args"]
    model.update(cross_attn_every=1, cross_attn_heads=2, num_latents=4, resampler_depth=1, resampler_heads=2)
    model["vision"]["init_args"].update(image_size=16, patch_size=8, width=16, depth=2, num_heads=2)
    model["decoder"]["init_args"]["name_or_path"] = hf_dir
    args["tokenizer"]["init_args"].update(name_or_path=hf_dir, context_length=32)
    args.update(vision_weights=None, max_new_tokens=3, num_beams=1)
    cfg["data"] = {"class_path": "vlm.data.datamodules.ImageTextDataModule",
                   "init_args": {"source": {"class_path": "vlm.data.builtin.ShapesSource",
                                            "init_args": {"data_dir": str(shapes), "num_train": 16, "num_val": 4}},
                                 "batch_size": 2, "in_memory": True, "num_workers": 0}}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_job([[sys.executable, "-m", "vlm", "fit", "--config", str(config)]], cwd=ROOT, env=subprocess_env())
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert ckpt["global_step"] == 2
    task = load_task(root / "checkpoints" / "last.ckpt")  # one full file, as vlm.load and the scripts read
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    # The frozen decoder came through sharding and gathering unchanged, in bf16; the bridge trained, in float32.
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, ref.state_dict()[k])
               for k, p in task.model.decoder.model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in task.model.cross_attn.parameters())
    gates = torch.stack([b.attn_gate.detach().flatten()[0] for b in task.model.cross_attn])
    assert bool((gates != 0).any())


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_hf_lm_config_trains_under_fsdp_with_a_local_decoder(hf_lm_dirs, shapes, tmp_path, name):
    """The shipped GPU config on 2 CPU processes (gloo, CPU bf16 autocast)."""
    run_hf_lm_config(hf_lm_dirs[name], shapes, tmp_path, "cpu", 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_lm_config_trains_under_fsdp_on_gpus(hf_lm_dirs, shapes, tmp_path):
    """The same on the GPUs (NCCL, CUDA bf16 autocast): one FSDP2 rank per GPU, up to 2 (one GPU: a world of one,
    which still runs the sharded code path)."""
    run_hf_lm_config(hf_lm_dirs["llama"], shapes, tmp_path, "gpu", min(2, torch.cuda.device_count()))


def test_memory_suite_fsdp_row_shards_what_each_rank_holds():
    """``scripts/benchmark.py --suite memory``'s FSDP2-vs-DDP rows (2 spawned ranks, gloo): each FSDP2 rank holds
    half of the parameters and optimizer state that each DDP rank holds."""
    from benchmarks.core import Settings
    from benchmarks.sharded import sharded_memory_rows

    peak, held = sharded_memory_rows("memory", Settings(quick=True, repeats=1))
    assert peak.name.endswith("per-rank peak memory, FSDP2 vs DDP") and peak.ours > 0 and peak.peer > 0
    assert held.name.endswith("per-rank parameters + optimizer state, FSDP2 vs DDP")
    assert held.ours == pytest.approx(held.peer / 2, rel=0.02)
