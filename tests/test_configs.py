"""Every shipped config instantiates (model, data module, trainer), and config typos get LightningCLI's error."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

ROOT = Path(__file__).parent.parent
CONFIGS = sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml"))
# Configs that only override a base config are composed with it (`vlm fit --config BASE --config OVERRIDE`).
BASES = {str(ROOT / "configs/clip/shapes_scenes.yaml"): str(ROOT / "configs/clip/shapes.yaml")}
# Configs that need hardware or hub access this machine lacks are instantiated with these overrides:
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def instantiate(config: str, *extra: str) -> LightningCLI:
    configs = ["--config", BASES[config], "--config", config] if config in BASES else ["--config", config]
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[*configs, *CPU, *extra],
    )


def test_configs_exist():
    assert any(c.endswith("clip/shapes.yaml") for c in CONFIGS)


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if "hf_lm" not in c], ids=lambda c: Path(c).parent.name + "/" + Path(c).name
)
def test_config_instantiates(config, tmp_path):
    cli = instantiate(config, f"--trainer.default_root_dir={tmp_path}")
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)
    assert cli.model.image_size > 0 and cli.model.tokenizer is not None


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
    assert base.datamodule.two_object_prob == 0 and scenes.datamodule.two_object_prob > 0
    assert str(scenes.datamodule.data_dir) == flamingo["data"]["init_args"]["data_dir"]
    assert scenes.trainer.max_steps == base.trainer.max_steps


def test_config_typo_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = Path(CONFIGS[0]).read_text().replace("warmup_steps:", "warmup_stpes:")
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        instantiate(str(bad))
    assert e.value.code != 0
    assert "warmup_stpes" in capsys.readouterr().err
