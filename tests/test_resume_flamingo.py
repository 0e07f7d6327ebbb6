"""Exact resume after SIGKILL and SIGTERM for the Flamingo task (see ``test_resume.py``): the decoder uses dropout,
so the resumed run's random stream must continue exactly too, and batches come from 2 data-loader worker processes
(whose iterator asks the batch sampler twice for its first pass)."""

from __future__ import annotations

import signal

import pytest
from resume_helpers import check_exact_resume, fit_config, flamingo_task_config, interrupt_and_resume, write_config

from vlm.data import shapes as S

MAX_STEPS, EVERY, VAL_EVERY = 16, 5, 8  # 12 batches of 8 per epoch: checkpoints at 5, 10, 15, 16; validation at 8, 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_flamingo")
    S.generate_shapes(tmp / "shapes", train=96, val=36, seed=0, image_size=32, processes=1)
    cfg = fit_config(flamingo_task_config(), tmp / "shapes", tmp / "unused", MAX_STEPS, EVERY, VAL_EVERY,
                     num_workers=2)
    config = write_config(cfg, tmp / "config.json")
    return interrupt_and_resume(tmp, config, {"sigkill": ("SIGKILL", 14), "sigterm": ("SIGTERM", 7)})


def test_sigkill_then_resume_equals_the_uninterrupted_run(runs):
    run = runs["sigkill"]
    assert run["code"] == -signal.SIGKILL
    assert run["saved"]["global_step"] == 10 and run["saved"]["epoch"] == 0
    check_exact_resume(runs, "sigkill", MAX_STEPS, steps_per_epoch=12, batch=8)


def test_sigterm_then_resume_equals_the_uninterrupted_run(runs):
    run = runs["sigterm"]
    assert run["code"] == 128 + signal.SIGTERM, run["log"].read_text()[-3000:]
    assert run["saved"]["global_step"] == 7
    check_exact_resume(runs, "sigterm", MAX_STEPS, steps_per_epoch=12, batch=8)
