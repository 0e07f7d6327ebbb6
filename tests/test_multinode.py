"""Two nodes, simulated on this machine: two ``vlm fit`` processes started as a cluster launcher starts one per node
(``--trainer.num_nodes 2 --trainer.devices 1`` with ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` and ``NODE_RANK``
in the environment, which Lightning's ``LightningEnvironment`` reads, or under ``torchrun``) train the tiny CLIP
(DDP, or FSDP2 for Lightning's launcher) exactly as one node with two processes does: the same global ranks see
the same batches and the 2-way gradient sums are the same, so the checkpoints are equal bit for bit."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import run_job
from resume_helpers import ROOT, clip_task_config, fit_config, subprocess_env, write_config

from vlm.data import shapes as S

STEPS = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("multinode") / "shapes"
    S.generate_shapes(path, train=96, val=36, seed=0, image_size=32, processes=1)
    return path


def _fit(config, *args: str) -> list[str]:
    return [sys.executable, "-m", "vlm", "fit", "--config", str(config), *args]


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
            run_job([_fit(_config(shapes, root, strategy))], cwd=ROOT, env=subprocess_env())
            done[strategy] = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        return done[strategy]

    return run


@pytest.mark.parametrize(("launcher", "strategy"), [("lightning", "ddp"), ("lightning", "fsdp"), ("torchrun", "ddp")])
def test_two_nodes_of_one_process_train_like_one_node_of_two(shapes, one_node, tmp_path, launcher, strategy):
    """``lightning``: each node runs ``vlm fit`` itself with MASTER_ADDR / MASTER_PORT / NODE_RANK set;
    ``torchrun``: each node runs ``torchrun --nnodes 2 --node-rank R ... -m vlm fit`` (TorchElasticEnvironment)."""
    config = _config(shapes, tmp_path / "two_nodes", strategy)
    args = ["--trainer.devices", "1", "--trainer.num_nodes", "2"]

    def nodes(port: int) -> list[tuple[list[str], dict]]:
        if launcher == "torchrun":
            return [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                      "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                      "-m", "vlm", "fit", "--config", str(config), *args], subprocess_env()) for rank in (0, 1)]
        return [(_fit(config, *args), {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                       "NODE_RANK": str(rank)}) for rank in (0, 1)]

    run_job(nodes, cwd=ROOT)  # again on a fresh port if another job took this one first

    one = one_node(strategy)
    two = torch.load(tmp_path / "two_nodes" / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == STEPS
    assert len(two["vlm_rng_states"]) == 2  # one world of two ranks, not two worlds of one
    assert set(one["state_dict"]) == set(two["state_dict"])
    for name, value in one["state_dict"].items():
        assert torch.equal(value, two["state_dict"][name]), name
    assert one["optimizer_states"][0]["state"].keys() == two["optimizer_states"][0]["state"].keys()
