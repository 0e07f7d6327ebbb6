"""Exact resume under 2-process CPU DDP (gloo), through ``python -m vlm fit`` with ``trainer.strategy: ddp``: a run
whose whole process group is SIGKILLed mid-epoch (as when a node dies) and resumed with ``--ckpt_path last`` ends
with the same bits as an uninterrupted 2-process run, every rank having trained on the same batches in the same
order, and no sample of the interrupted epoch trained twice or skipped across the two ranks. SIGTERM sent to rank 0
alone stops both ranks at the same step with ``last.ckpt`` written and exit status 143 (Lightning's own handler
deadlocks here), and that run resumes as exactly."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import DISTRIBUTED_TIMEOUT_S, port_taken
from resume_helpers import (
    assert_same_training_state,
    clip_task_config,
    fit_config,
    interrupt_and_resume,
    load,
    records,
    trained_sequence,
    write_config,
)

from vlm.data import shapes as S

MAX_STEPS, EVERY, VAL_EVERY = 20, 5, 8  # 96 images, 2 ranks x 4 per step: 12 steps per epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_ddp")
    S.generate_shapes(tmp / "shapes", train=96, val=36, seed=0, image_size=32, processes=1)
    cfg = fit_config(clip_task_config(), tmp / "shapes", tmp / "unused", MAX_STEPS, EVERY, VAL_EVERY, ddp=True)
    # Every run also meets a NaN on rank 1 alone at step 6: both ranks must skip that step together.
    poison = {"class_path": "resume_helpers.PoisonBatch", "init_args": {"step": 6, "rank": 1}}
    cfg["trainer"]["callbacks"].append(poison)
    config = write_config(cfg, tmp / "config.json")
    for attempt in range(3):  # Lightning picks each run's port free, then binds it: another job may take it between
        runs = tmp / f"attempt{attempt}"
        runs.mkdir()
        try:
            return interrupt_and_resume(runs, config, {"sigkill": ("SIGKILL", 17), "sigterm": ("SIGTERM", 9)},
                                        timeout=DISTRIBUTED_TIMEOUT_S, per_rank=True)
        except (AssertionError, OSError):
            if attempt == 2 or not any(port_taken(log.read_text()) for log in runs.glob("*.log")):
                raise


def _rank_records(path: Path, rank: int) -> list[dict]:
    return records(Path(f"{path}.rank{rank}"))


def test_ddp_sigkill_then_resume_equals_the_uninterrupted_run(runs):
    run, reference = runs["sigkill"], runs["reference"]
    assert run["code"] == -signal.SIGKILL
    assert run["saved"]["global_step"] == 15 and len(run["saved"]["vlm_rng_states"]) == 2  # both ranks' streams
    ref_ckpt = load(reference["dir"] / "checkpoints" / "last.ckpt")
    assert ref_ckpt["global_step"] == MAX_STEPS
    assert_same_training_state(load(run["dir"] / "checkpoints" / "last.ckpt"), ref_ckpt)
    assert ref_ckpt["callbacks"]["NonFiniteGuard"]["skipped"] == 1  # rank 1's NaN: skipped by both, in step

    epoch = []
    for rank in (0, 1):
        lines = _rank_records(run["records"], rank)
        steps = trained_sequence(lines)
        assert steps == trained_sequence(_rank_records(reference["records"], rank)), f"rank {rank}"
        assert [r["step"] for r in lines].count(16) == 2  # step 16 ran, was lost with the process, ran again
        epoch += [p for step, paths in steps.items() if step > 12 for p in paths]
    assert len(epoch) == len(set(epoch)) == (MAX_STEPS - 12) * 8  # across both ranks: none twice, none skipped


def test_ddp_sigterm_to_rank_0_stops_every_rank_saves_and_resumes_exactly(runs):
    run = runs["sigterm"]
    assert run["code"] == 128 + signal.SIGTERM, run["log"].read_text()[-3000:]
    assert run["saved"]["global_step"] == 9
    for rank in (0, 1):  # both ranks stopped right after step 9
        assert max(r["step"] for r in run["before"][rank]) == 9
    assert_same_training_state(load(run["dir"] / "checkpoints" / "last.ckpt"),
                               load(runs["reference"]["dir"] / "checkpoints" / "last.ckpt"))
