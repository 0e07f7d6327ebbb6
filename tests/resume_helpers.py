"""Shared by the resume tests: tiny ``vlm fit`` configs, callbacks the subprocess runs load by ``class_path``
(the tests put this folder on ``PYTHONPATH``), and a runner for ``python -m vlm fit`` in a subprocess.

The runs use one intra-op thread (``OMP_NUM_THREADS=1``): the test machines have 2 shared cores, and the same thread
count in every run keeps the CPU kernels' reduction order, hence the bits, the same.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_CLIP
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ callbacks
class RecordBatches(Callback):
    """Appends ``{"step", "epoch", "paths"}`` of every trained batch to a JSON-lines file (rank 0's batches, or every
    rank's to ``path.rankN`` when ``per_rank``)."""

    def __init__(self, path: str, per_rank: bool = False) -> None:
        self.path, self.per_rank = path, per_rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.per_rank and trainer.global_rank != 0:
            return
        path = f"{self.path}.rank{trainer.global_rank}" if self.per_rank else self.path
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                "paths": list(batch["path"])}) + "\n")


class SignalAtStep(Callback):
    """Sends ``signal`` once ``step`` optimizer steps are done (in ``on_train_batch_end``, before the checkpoint
    callback, which Lightning always runs last). SIGKILL goes to the whole process group (every DDP rank, as when a
    node dies), SIGTERM to this process only (as a scheduler's pre-emption notice)."""

    def __init__(self, step: int, name: str = "SIGKILL") -> None:
        self.step, self.signum = step, getattr(signal, name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        if self.signum == signal.SIGKILL:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), self.signum)


class PoisonBatch(Callback):
    """Puts a NaN into the images of the batch of ``step`` on ``rank`` only (its loss and gradients turn NaN)."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch["image"][0, 0, 0, 0] = float("nan")


# ------------------------------------------------------------------------------------------------- configs
def clip_task_config() -> dict:
    """The tiny CLIP of conftest with stochastic depth, so the weights depend on the random stream too."""
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["init_args"]["model"]["init_args"]["vision"]["init_args"]["drop_path"] = 0.2
    cfg["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = 3
    return cfg


def flamingo_task_config() -> dict:
    """A tiny Flamingo on GPT-2's BPE, frozen parts randomly initialised (no earlier stage to read)."""
    return {
        "class_path": "vlm.tasks.captioning.FlamingoTask",
        "init_args": {
            "model": {
                "class_path": "vlm.models.flamingo.Flamingo",
                "init_args": {
                    "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                               "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1,
                                             "num_heads": 2}},
                    "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                                "init_args": {"vocab_size": 50257, "context_length": 24, "width": 16, "depth": 2,
                                              "num_heads": 2, "dropout": 0.1}},
                    "cross_attn_every": 1, "cross_attn_heads": 2, "cross_attn_mlp_ratio": 2.0, "num_latents": 4,
                    "resampler_depth": 1, "resampler_heads": 2,
                },
            },
            "vision_weights": None,
            "decoder_weights": None,
            "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                          "init_args": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95], "eps": 1e-8}},
            "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine",
                             "init_args": {"warmup_steps": 3, "min_lr_ratio": 0.1}},
            "max_new_tokens": 4,
            "attribute_words": [],
        },
    }


def fit_config(task: dict, data_dir: Path, root: Path, max_steps: int, every: int, val_every: int,
               ddp: bool = False, num_workers: int = 0) -> dict:
    """A ``vlm fit`` config: the given task on the shapes in ``data_dir`` (96 training images: 12 batches of 8, or
    12 steps of 2 x 4 under DDP), checkpoints every ``every`` steps into ``root/checkpoints``, ``num_workers``
    data-loader processes."""
    trainer = {
        "accelerator": "cpu", "devices": 2 if ddp else 1, "precision": "32-true",
        "max_steps": max_steps, "max_epochs": -1, "val_check_interval": val_every, "check_val_every_n_epoch": None,
        "limit_val_batches": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
        "default_root_dir": str(root), "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [
            {"class_path": "vlm.callbacks.Checkpoint", "init_args": {"every_n_train_steps": every, "save_top_k": 0}},
            {"class_path": "vlm.callbacks.NonFiniteGuard"},
        ],
    }
    if ddp:
        trainer["strategy"] = "ddp"
    data = {"class_path": "vlm.data.datamodules.ImageTextDataModule",
            "init_args": {"source": {"class_path": "vlm.data.builtin.ShapesSource",
                                     "init_args": {"data_dir": str(data_dir), "num_train": 96, "num_val": 36}},
                          "batch_size": 4 if ddp else 8, "in_memory": True, "num_workers": num_workers}}
    return {"seed_everything": 7, "trainer": trainer, "model": task, "data": data}


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is YAML
    return path


# ---------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def one_thread():
    """One intra-op thread in this process (tests training in-process): on 2 shared cores, two spinning threads per
    process slow tiny models down by 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_fit(config: Path, *args: str, log: Path) -> subprocess.Popen:
    """``python -m vlm fit --config CONFIG ARGS`` in its own process group, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "vlm", "fit", "--config", str(config), *args], cwd=ROOT,
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"vlm fit did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None


def callback_arg(class_path: str, **init_args) -> str:
    """A command-line argument appending a callback to the config's ``trainer.callbacks``."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def interrupt_and_resume(tmp_path: Path, config: Path, interrupts: dict[str, tuple[str, int]],
                         timeout: float = 300, per_rank: bool = False) -> dict[str, dict]:
    """Runs the uninterrupted reference and one run per ``interrupts`` entry (name -> (signal, step)) side by side,
    then resumes every interrupted run with ``--ckpt_path last``.

    Returns, per name (and ``"reference"``): ``code`` (exit status of the first process), ``saved`` (its
    ``last.ckpt`` when it died), ``before`` (its batch records before resuming), ``dir`` (its run directory) and
    ``log``. Batch records go to ``<name>.jsonl`` (``<name>.jsonl.rankN`` with ``per_rank``).
    """
    out: dict[str, dict] = {}
    procs = {}
    for name in ["reference", *interrupts]:
        run = {"dir": tmp_path / name, "records": tmp_path / f"{name}.jsonl", "log": tmp_path / f"{name}.log"}
        extra = [callback_arg("resume_helpers.RecordBatches", path=str(run["records"]), per_rank=per_rank)]
        if name in interrupts:
            signal_name, step = interrupts[name]
            extra.append(callback_arg("resume_helpers.SignalAtStep", step=step, name=signal_name))
        procs[name] = start_fit(config, f"--trainer.default_root_dir={run['dir']}", *extra, log=run["log"])
        out[name] = run
    for name, proc in procs.items():
        out[name]["code"] = wait(proc, out[name]["log"], timeout)
    assert out["reference"]["code"] == 0, out["reference"]["log"].read_text()[-3000:]
    resumed = {}
    for name in interrupts:
        run = out[name]
        run["saved"] = load(run["dir"] / "checkpoints" / "last.ckpt")
        run["before"] = ({rank: records(Path(f"{run['records']}.rank{rank}")) for rank in (0, 1)} if per_rank
                         else records(run["records"]))
        run["resume_log"] = tmp_path / f"{name}-resumed.log"
        resumed[name] = start_fit(config, f"--trainer.default_root_dir={run['dir']}", "--ckpt_path=last",
                                  callback_arg("resume_helpers.RecordBatches", path=str(run["records"]),
                                               per_rank=per_rank),
                                  log=run["resume_log"])
    for name, proc in resumed.items():
        log = out[name]["resume_log"]
        assert wait(proc, log, timeout) == 0, log.read_text()[-3000:]
    return out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def trained_sequence(lines: list[dict]) -> dict[int, list[str]]:
    """Step -> paths of the batch that produced it; a replayed step (after a resume) keeps its latest record."""
    return {r["step"]: r["paths"] for r in lines}


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer and schedule state, progress and random state of two checkpoints are equal."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        # The CPU kernels are deterministic for a fixed thread count: equal bits (allclose 1e-6 would also pass
        # the bar, but anything less than equality here would hide a real divergence).
        assert torch.equal(value, b["state_dict"][name]), f"weights differ: {name}"
    _assert_tree_equal(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_tree_equal(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    _assert_tree_equal(a["vlm_rng_states"], b["vlm_rng_states"], "rng")


def check_exact_resume(runs: dict[str, dict], name: str, max_steps: int, steps_per_epoch: int,
                       batch: int) -> None:
    """Run ``name`` (interrupted, resumed) ends in the reference's exact state and trained on the same batches."""
    run = runs[name]
    ref = load(runs["reference"]["dir"] / "checkpoints" / "last.ckpt")
    out = load(run["dir"] / "checkpoints" / "last.ckpt")
    assert ref["global_step"] == max_steps
    assert_same_training_state(out, ref)

    saved_step = run["saved"]["global_step"]
    before, lines = run["before"], records(run["records"])
    after = lines[len(before):]
    assert after[0]["step"] == saved_step + 1  # the resumed run starts right after the saved step
    assert trained_sequence(lines) == trained_sequence(records(runs["reference"]["records"]))  # same batches, order
    epoch = run["saved"]["epoch"]  # the interrupted epoch, trained before the save and after the resume
    paths = [p for r in before if r["epoch"] == epoch and r["step"] <= saved_step for p in r["paths"]]
    paths += [p for r in after if r["epoch"] == epoch for p in r["paths"]]
    last = min(max_steps, (epoch + 1) * steps_per_epoch)
    assert len(paths) == len(set(paths)) == (last - epoch * steps_per_epoch) * batch  # none twice, none skipped


def _assert_tree_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"

