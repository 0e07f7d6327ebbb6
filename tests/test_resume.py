"""Exact resume after a crash, through the real command line (``python -m vlm fit --config ... --ckpt_path last``),
for the contrastive task.

A run SIGKILLed mid-epoch, two steps after its last checkpoint, and restarted from ``last.ckpt`` ends with the same
bits as a run never interrupted: weights, AdamW moments, learning-rate schedule, progress and random generators (the
image tower uses stochastic depth, so a wrong random stream changes the weights), and it trains on exactly the same
batches in the same order (the interrupted epoch neither repeats nor skips a sample). A run sent SIGTERM writes
``last.ckpt`` at that step, exits with 143 and no traceback, and resumes as exactly. All runs of a module share one
reference run and run side by side. Flamingo: ``test_resume_flamingo.py``; 2-process DDP: ``test_resume_ddp.py``.
"""

from __future__ import annotations

import signal

import pytest
from resume_helpers import check_exact_resume, clip_task_config, fit_config, interrupt_and_resume, write_config

from vlm.data import shapes as S

MAX_STEPS, EVERY, VAL_EVERY = 20, 5, 8  # 12 batches of 8 per epoch: checkpoints at 5, 10, 15, 20; validation at 8, 16


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    S.generate_shapes(root, train=96, val=36, seed=0, image_size=32, processes=1)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_dir):
    tmp = tmp_path_factory.mktemp("resume_clip")
    config = write_config(fit_config(clip_task_config(), shapes_dir, tmp / "unused", MAX_STEPS, EVERY, VAL_EVERY),
                          tmp / "config.json")
    return interrupt_and_resume(tmp, config, {"sigkill": ("SIGKILL", 17), "sigterm": ("SIGTERM", 13)})


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(runs):
    run = runs["sigkill"]
    assert run["code"] == -signal.SIGKILL
    assert run["saved"]["global_step"] == 15 and run["saved"]["epoch"] == 1  # 3 batches into epoch 1
    assert max(r["step"] for r in run["before"]) == 17  # it trained past the checkpoint before it died
    assert not list((run["dir"] / "checkpoints").glob(".tmp-*"))
    check_exact_resume(runs, "sigkill", MAX_STEPS, steps_per_epoch=12, batch=8)


def test_sigterm_saves_last_checkpoint_exits_143_and_resumes_exactly(runs):
    run = runs["sigterm"]
    log = run["log"].read_text()
    assert run["code"] == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log and "SIGTERM: saved" in log
    assert run["saved"]["global_step"] == 13  # written on SIGTERM, not the periodic one at step 10
    check_exact_resume(runs, "sigterm", MAX_STEPS, steps_per_epoch=12, batch=8)
