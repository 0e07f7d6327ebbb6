"""Every shipped config instantiates (model, data module, trainer), and config typos get LightningCLI's error."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from vlm.fit import build_from_config

ROOT = Path(__file__).parent.parent
CONFIGS = sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml"))
# Configs that only override a base config are composed with it (`vlm fit --config BASE --config OVERRIDE`).
BASES = {str(ROOT / "configs/clip/shapes_scenes.yaml"): str(ROOT / "configs/clip/shapes.yaml")}
# Configs that need hardware or hub access this machine lacks are instantiated with these overrides:
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def instantiate(config: str, *extra: str) -> LightningCLI:
    """``vlm fit``'s LightningCLI (with its links from the task to the data module) on ``config``, not run."""
    configs = ["--config", BASES[config], "--config", config] if config in BASES else ["--config", config]
    return build_from_config([*configs, *CPU, *extra])


def test_configs_exist():
    assert any(c.endswith("clip/shapes.yaml") for c in CONFIGS)


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if "hf_lm" not in c], ids=lambda c: Path(c).parent.name + "/" + Path(c).name
)
def test_config_instantiates(config, tmp_path):
    cli = instantiate(config, f"--trainer.default_root_dir={tmp_path}")
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    task, data = cli.model, cli.datamodule
    assert task.tokenizer is not None and data.tokenizer is task.tokenizer  # the data module is handed the task's
    if hasattr(data, "image_size"):  # image-text data: the task's image size and statistics
        assert task.image_size > 0 and data.image_size == task.image_size
        assert (data.image_mean, data.image_std) == (task.image_mean, task.image_std)
    model = getattr(task.model, "text", task.model)  # the CLIP text tower, the decoder, or Flamingo's
    length = getattr(model, "context_length", None)
    assert length is None or task.tokenizer.context_length <= length  # never more tokens than the model takes
    # one place for a run's outputs: the logs follow --trainer.default_root_dir with the checkpoints
    for logger in cli.trainer.loggers:
        assert Path(logger.save_dir).resolve().is_relative_to(tmp_path.resolve()), (config, logger.save_dir)


# The optimizer and schedule values every config trained with when they were the tasks' own arguments (lr,
# weight_decay, betas, eps, warmup_steps, min_lr_ratio): moved into optimizer / lr_scheduler, they are the same.
FORMER_OPTIMIZER = {
    "clip/digits.yaml": (2e-3, 0.05, (0.9, 0.98), 1e-6, 100, 0.0),
    "clip/shapes.yaml": (2e-3, 0.05, (0.9, 0.98), 1e-6, 100, 0.0),
    "clip/shapes_minilm.yaml": (2e-3, 0.05, (0.9, 0.98), 1e-6, 100, 0.0),
    "clip/shapes_scenes.yaml": (2e-3, 0.05, (0.9, 0.98), 1e-6, 100, 0.0),
    "clip/vit_b16.yaml": (5e-4, 0.2, (0.9, 0.98), 1e-6, 2000, 0.0),
    "flamingo/hf_lm.yaml": (1e-4, 0.1, (0.9, 0.95), 1e-8, 1000, 0.1),
    "flamingo/shapes.yaml": (1e-3, 0.05, (0.9, 0.95), 1e-8, 50, 0.1),
    "lm/shapes.yaml": (2e-3, 0.1, (0.9, 0.95), 1e-8, 50, 0.1),
}


@pytest.mark.parametrize("config", [c for c in CONFIGS if Path(c).parent.name + "/" + Path(c).name in FORMER_OPTIMIZER],
                         ids=lambda c: Path(c).parent.name + "/" + Path(c).name)
def test_config_trains_with_its_former_optimizer_values(config):
    import yaml

    name = Path(config).parent.name + "/" + Path(config).name
    lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio = FORMER_OPTIMIZER[name]
    if "hf_lm" in name:  # needs a hub model: the values as the file states them
        args = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
        assert args["optimizer"] == {"class_path": "vlm.tasks.optim.AdamW", "init_args": {
            "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "eps": eps}}
        assert args["lr_scheduler"] == {"class_path": "vlm.tasks.optim.WarmupCosine", "init_args": {
            "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio}}
        return
    built = instantiate(config).model.configure_optimizers()
    decayed, plain = built["optimizer"].param_groups
    peak = (decayed["initial_lr"], decayed["weight_decay"], decayed["betas"], decayed["eps"])  # "lr": warming up
    assert peak == (lr, weight_decay, betas, eps)
    assert (plain["initial_lr"], plain["weight_decay"]) == (lr, 0.0) and decayed["fused"]
    schedule = built["lr_scheduler"]["scheduler"]
    assert (type(schedule).__name__, schedule.warmup_steps, schedule.min_lr_ratio) == ("WarmupCosine", warmup_steps,
                                                                                       min_lr_ratio)


def test_scenes_stage_continues_the_clip_stage_on_the_flamingo_data(tmp_path):
    """Stage 1b starts from stage 1a's checkpoint and writes the tower the Flamingo config reads, on its data."""
    import yaml

    base = instantiate(str(ROOT / "configs/clip/shapes.yaml"))
    scenes = instantiate(str(ROOT / "configs/clip/shapes_scenes.yaml"))
    flamingo = yaml.safe_load((ROOT / "configs/flamingo/shapes.yaml").read_text())
    root_a, root_b = base.trainer.default_root_dir, scenes.trainer.default_root_dir
    assert root_a != root_b
    assert scenes.model.init_weights == f"{root_a}/checkpoints/last.ckpt"
    assert flamingo["model"]["init_args"]["vision_weights"] == f"{root_b}/checkpoints/last.ckpt"
    assert base.model.init_weights is None
    # The same model, only other data: the mixed scenes the Flamingo stage trains on.
    assert str(scenes.model.model) == str(base.model.model)
    assert base.datamodule.source.two_object_prob == 0 and scenes.datamodule.source.two_object_prob > 0
    source = flamingo["data"]["init_args"]["source"]["init_args"]["data_dir"]
    assert str(scenes.datamodule.source.data_dir) == source and scenes.datamodule.train == f"{source}/train"
    assert scenes.trainer.max_steps == base.trainer.max_steps


def test_config_typo_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = Path(CONFIGS[0]).read_text().replace("warmup_steps:", "warmup_stpes:")
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        instantiate(str(bad))
    assert e.value.code != 0
    assert "warmup_stpes" in capsys.readouterr().err
