"""Two nodes, simulated on this machine: two ``vlm fit`` processes started as a cluster launcher starts one per node
(``--trainer.num_nodes 2 --trainer.devices 1`` with ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` and ``NODE_RANK``
in the environment, which Lightning's ``LightningEnvironment`` reads, or under ``torchrun``) train the tiny CLIP
(DDP, or FSDP2 for Lightning's launcher) exactly as one node with two processes does: the same global ranks see
the same batches and the 2-way gradient sums are the same, so the checkpoints are equal bit for bit."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from resume_helpers import ROOT, clip_task_config, fit_config, subprocess_env, write_config

from vlm.data import shapes as S

STEPS = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("multinode") / "shapes"
    S.generate_shapes(path, train=96, val=36, seed=0, image_size=32, processes=1)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(config, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm", "fit", "--config", str(config), *args], cwd=ROOT,
                            env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]


def _config(shapes, root, strategy: str):
    cfg = fit_config(clip_task_config(), shapes, root, STEPS, 2, 1000, ddp=True)  # no validation
    if strategy == "fsdp":
        cfg["trainer"]["strategy"] = {"class_path": "vlm.tasks.sharding.FSDP2Strategy",
                                      "init_args": {"save_distributed_checkpoint": False}}
    return write_config(cfg, root.with_suffix(".json"))


@pytest.fixture(scope="module")
def one_node(shapes, tmp_path_factory):
    """Per strategy, the checkpoint of one node with two processes (Lightning starts the second one itself)."""
    done = {}

    def run(strategy: str):
        if strategy not in done:
            root = tmp_path_factory.mktemp("one_node") / strategy
            _wait(_fit(_config(shapes, root, strategy)))
            done[strategy] = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        return done[strategy]

    return run


@pytest.mark.parametrize(("launcher", "strategy"), [("lightning", "ddp"), ("lightning", "fsdp"), ("torchrun", "ddp")])
def test_two_nodes_of_one_process_train_like_one_node_of_two(shapes, one_node, tmp_path, launcher, strategy):
    """``lightning``: each node runs ``vlm fit`` itself with MASTER_ADDR / MASTER_PORT / NODE_RANK set;
    ``torchrun``: each node runs ``torchrun --nnodes 2 --node-rank R ... -m vlm fit`` (TorchElasticEnvironment)."""
    config = _config(shapes, tmp_path / "two_nodes", strategy)
    port = str(_free_port())
    nodes = []
    for rank in (0, 1):
        args = ["--trainer.devices", "1", "--trainer.num_nodes", "2"]
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "-m", "vlm", "fit",
                   "--config", str(config), *args]
            nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        else:
            env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)}
            nodes.append(_fit(config, *args, env=env))
    for node in nodes:
        _wait(node)

    one = one_node(strategy)
    two = torch.load(tmp_path / "two_nodes" / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == STEPS
    assert len(two["vlm_rng_states"]) == 2  # one world of two ranks, not two worlds of one
    assert set(one["state_dict"]) == set(two["state_dict"])
    for name, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][name]), name
    assert one["optimizer_states"][0]["state"].keys() == two["optimizer_states"][0]["state"].keys()
