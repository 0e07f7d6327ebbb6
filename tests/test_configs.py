"""Every shipped config instantiates (model, data module, trainer), and config typos get LightningCLI's error."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml"))
# Configs that need hardware or hub access this machine lacks are instantiated with these overrides:
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


def instantiate(config: str, *extra: str) -> LightningCLI:
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", config, *CPU, *extra],
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


def test_config_typo_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    text = Path(CONFIGS[0]).read_text().replace("warmup_steps:", "warmup_stpes:")
    bad.write_text(text)
    with pytest.raises(SystemExit) as e:
        instantiate(str(bad))
    assert e.value.code != 0
    assert "warmup_stpes" in capsys.readouterr().err
