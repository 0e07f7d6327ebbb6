"""Shared fixtures: tiny model configs so every test runs in seconds on a 2-core CPU, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CLIP = {
    "class_path": "vlm.tasks.contrastive.ContrastiveTask",
    "init_args": {
        "model": {
            "class_path": "vlm.models.clip.CLIP",
            "init_args": {
                "vision": {
                    "class_path": "vlm.models.vit.VisionTransformer",
                    "init_args": {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2},
                },
                "text": {
                    "class_path": "vlm.models.text.TextTransformer",
                    "init_args": {"context_length": 16, "width": 32, "depth": 2, "num_heads": 2},
                },
                "embed_dim": 16,
            },
        },
        "tokenizer": {"class_path": "vlm.data.tokenizer.CLIPTokenizer", "init_args": {"context_length": 16}},
        "optimizer": {"class_path": "vlm.tasks.optim.AdamW",
                      "init_args": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6}},
        "lr_scheduler": {"class_path": "vlm.tasks.optim.WarmupCosine", "init_args": {"warmup_steps": 1}},
        "templates": ["a {}"],
    },
}


TINY_FLAMINGO = {  # a Flamingo task small enough for any test
    "class_path": "vlm.tasks.captioning.FlamingoTask",
    "init_args": {
        "model": {"class_path": "vlm.models.flamingo.Flamingo", "init_args": {
            "vision": {"class_path": "vlm.models.vit.VisionTransformer",
                       "init_args": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2}},
            "decoder": {"class_path": "vlm.models.decoder.DecoderLM",
                        "init_args": {"context_length": 24, "width": 16, "depth": 1, "num_heads": 2}},
            "num_latents": 2, "resampler_depth": 1, "resampler_heads": 2, "cross_attn_heads": 2}},
        "max_new_tokens": 5,
    },
}  # fmt: skip


def tiny_clip_config(warmup_steps: int | None = None, **overrides) -> dict:
    """A copy of the tiny CLIP task config with top-level ``init_args`` overridden (``warmup_steps``: the
    schedule's)."""
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["init_args"].update(overrides)
    if warmup_steps is not None:
        cfg["init_args"]["lr_scheduler"]["init_args"]["warmup_steps"] = warmup_steps
    return cfg


def build_trainable(config: dict):
    """A task built from ``config`` as ``vlm fit`` builds it (jsonargparse), its ``optimizer`` and ``lr_scheduler``
    included (:func:`vlm.formats.build_task` builds tasks for inference, without them); its hyper-parameters are the
    config, as under LightningCLI."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    from vlm.formats.checkpoint import task_hparams_quiet, with_config

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--task", type=LightningModule)
    with task_hparams_quiet():
        task = parser.instantiate(parser.parse_object({"task": copy.deepcopy(config)})).task
    return with_config(task, config)


def write_tiny_checkpoints(folder, flamingo_context: int | None = None) -> dict:
    """``clip.ckpt`` and ``flamingo.ckpt`` (its gates opened, so the image changes the caption) of the tiny configs,
    as ``vlm fit`` saves them, in ``folder``; returns ``{"clip": path, "flamingo": path}``. ``flamingo_context``: the
    decoder's context length instead of the tiny config's 24 (room for few-shot prompts)."""
    from pathlib import Path

    from vlm.formats import build_task

    flamingo = copy.deepcopy(TINY_FLAMINGO)
    if flamingo_context is not None:
        flamingo["init_args"]["model"]["init_args"]["decoder"]["init_args"]["context_length"] = flamingo_context
    out = {}
    for name, config in (("clip", tiny_clip_config()), ("flamingo", flamingo)):
        torch.manual_seed(0)
        task = build_task(config)
        if name == "flamingo":
            with torch.no_grad():
                for blk in task.model.cross_attn:
                    blk.attn_gate.fill_(1.0)
                    blk.mlp_gate.fill_(1.0)
        ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "inference": task.inference_settings()}  # fmt: skip
        out[name] = Path(folder) / f"{name}.ckpt"
        torch.save(ckpt, out[name])
    return out


@pytest.fixture
def tiny_clip_task():
    from vlm.formats import build_task

    torch.manual_seed(0)
    return build_task(tiny_clip_config())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_lm_dirs(tmp_path_factory):
    """Tiny random causal LMs (GPT-2, OPT, Llama) saved with save_pretrained, each with the GPT-2 BPE tokenizer next
    to it: ``{name: directory}``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from vlm.data.gpt2_tokenizer import load_hf_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    tokenizer = load_hf_tokenizer(None)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        # OPT: learned positions offset by 2, biases, a ReLU MLP; its real vocabulary is GPT-2's BPE padded to 50272.
        "opt": OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)),
        # A vocabulary larger than the tokenizer's (padded, as OPT's and Qwen's are): new ids go after it.
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50272, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, bos_token_id=50256, eos_token_id=50256,
                                              pad_token_id=None, initializer_range=0.3)),  # varied generations
    }
    dirs = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


FP32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one unit in the last place (ulp) of 1.0 in float32


def assert_fp32_close(actual, fp32_reference, float64_reference, *, factor: float = 4.0, ulps: float = 8.0,
                      msg: str = "") -> None:
    """``actual``, a float32 computation of the value ``float64_reference`` holds, is as accurate as
    ``fp32_reference``, the reference implementation's own float32 computation of it: its greatest distance from the
    float64 value is at most ``factor`` times the reference's, and never needs to be below ``ulps`` ulps of the
    largest value (where the reference happens to round almost exactly).

    Two float32 computations of one value differ only in the order and grouping of their sums (MKL or oneDNN,
    AVX2 or AVX-512, a cache or a full pass), and those rounding errors are of one size, whichever CPU runs them;
    the factor leaves room for the spread of the greatest of them. Any real difference (a wrong mask, position or
    weight) is orders of magnitude above either."""
    exact = float64_reference.detach().double()
    assert actual.shape == exact.shape == fp32_reference.shape, msg
    assert actual.dtype == fp32_reference.dtype == torch.float32, msg
    reference_error = (fp32_reference.detach().double() - exact).abs().max().item()
    bound = max(factor * reference_error, ulps * FP32_EPS * exact.abs().max().item())
    error = (actual.detach().double() - exact).abs().max().item()
    assert error <= bound, (f"{msg}: float32 result {error:.3g} from the float64 one, the reference's float32 result "
                            f"{reference_error:.3g} (bound {bound:.3g})")


# A job of several processes on this machine: generous for a loaded 2-core machine, yet bounded, so that a hung rank
# fails its test instead of holding the machine.
DISTRIBUTED_TIMEOUT_S = 900
_PORT_TAKEN = ("eaddrinuse", "address already in use", "errno: 98")


def port_taken(output: str) -> bool:
    """Whether a process's output says that its rendezvous port was already in use."""
    return any(word in output.lower() for word in _PORT_TAKEN)


def free_port() -> int:
    """A port the OS reports free now; another process may take it before the job binds it, which
    :func:`run_job` notices and answers with a fresh one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(commands, *, timeout: float = DISTRIBUTED_TIMEOUT_S, attempts: int = 3, **popen_kwargs) -> list[str]:
    """Runs the processes of one distributed job together and returns each one's output (stdout and stderr).

    ``commands`` is a list of argument lists (or of ``(arguments, environment)`` pairs), or a function of a port
    giving that list, called with a fresh :func:`free_port` for every attempt. Each process leads a session of its
    own, so that the ranks it starts end with it. As soon as one process fails, the others are stopped; if any
    output says the rendezvous port was taken (between the pick and the bind, by another job on this machine), the
    whole job runs again on a fresh port, up to ``attempts`` times. Otherwise a failure, or a job still running
    after ``timeout`` seconds, fails the test with the outputs' tails.
    """
    import signal
    import subprocess
    import tempfile
    import time

    for attempt in range(attempts):
        argv = commands(free_port()) if callable(commands) else commands
        argv = [cmd if isinstance(cmd, tuple) else (cmd, popen_kwargs.get("env")) for cmd in argv]
        logs = [tempfile.TemporaryFile(mode="w+") for _ in argv]
        kwargs = {k: v for k, v in popen_kwargs.items() if k != "env"}
        procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True, **kwargs) for (cmd, env), log in zip(argv, logs)]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        timed_out = any(p.poll() is None for p in procs) and time.monotonic() >= deadline
        for p in procs:  # a failed or hung job's whole session: the ranks that Lightning or torchrun started too
            if p.returncode != 0:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        if all(p.returncode == 0 for p in procs):
            return outputs
        if not any(port_taken(out) for out in outputs) or attempt == attempts - 1:
            # The ranks of one process write to one output: its error lines first, as a crashed peer's may be early.
            tails = "\n".join(f"--- process {i} (exit {p.returncode}), error lines:\n"
                              + "\n".join([line for line in out.splitlines() if "Error" in line][:20])
                              + f"\n--- its end:\n{out[-3000:]}" for i, (p, out) in enumerate(zip(procs, outputs)))
            reason = f"still running after {timeout:.0f} s" if timed_out else "failed"
            raise AssertionError(f"distributed job {reason}:\n{tails}")
    raise AssertionError("unreachable")
