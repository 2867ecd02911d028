"""Tests of the experiment registry and configs against the report's and baseline's values."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import configs
from unet_jax.config import Config

# The values every experiment fixes explicitly, written out by hand from the report (Table 1)
# and the baseline's defaults, not derived from the modules under test.
RUN1 = {
    "batch_size": 16,
    "epochs": 7,
    "learning_rate": 3e-4,
    "weight_decay": 0.0,
    "image_size": 256,
    "aug_scale": 0.05,
    "aug_angle": 15.0,
    "aug_flip": 0.5,
    "loss": "dice",
    "sampling": "weighted",
    "dataset_config": "baseline",
    "source": "lgg",
    "split": "holdout",
    "schedule": "constant",
    "features": 32,
}
RUN2 = {**RUN1, "batch_size": 32, "epochs": 10, "learning_rate": 1e-3, "weight_decay": 1e-4}
BASELINE = {**RUN1, "epochs": 100, "learning_rate": 1e-4}


def _differences(a: Config, b: Config, ignore: tuple[str, ...] = ("name",)) -> dict[str, tuple]:
    return {
        f.name: (getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(Config)
        if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)
    }


@pytest.mark.parametrize("name, expected", [("run1", RUN1), ("run2", RUN2), ("baseline", BASELINE)])
def test_single_runs_have_the_documented_values(name: str, expected: dict):
    config = configs.get_config(name)
    assert isinstance(config, Config)
    assert config.name == name
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    # Everything not listed is the Config default (i.e. the baseline's).
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name not in expected and f.name != "name":
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name


def test_every_experiment_loads_and_is_documented():
    for name in configs.EXPERIMENTS:
        module = configs.load(name)
        assert f"python -m experiments.run --exp={name}" in module.__doc__
        assert "Measured:" in module.__doc__
        assert isinstance(module.get_config(), Config)
        runs = configs.get_configs(name)
        assert runs and all(isinstance(c, Config) for c in runs.values())
        # Round trip through the saved form, as training writes config.json.
        for config in runs.values():
            assert Config.from_dict(config.to_dict()) == config


def test_ablation_changes_one_field_at_a_time():
    run1 = configs.get_config("run1")
    runs = configs.get_configs("ablation")
    assert list(runs) == ["run1", "batch32", "lr1e-3", "wd1e-4", "epochs10"]
    assert _differences(runs["run1"], run1) == {}
    expected = {
        "batch32": ("batch_size", 32),
        "lr1e-3": ("learning_rate", 1e-3),
        "wd1e-4": ("weight_decay", 1e-4),
        "epochs10": ("epochs", 10),
    }
    run2 = configs.get_config("run2")
    for name, (field, value) in expected.items():
        diff = _differences(runs[name], run1)
        assert list(diff) == [field], name
        assert diff[field][0] == value
        assert getattr(run2, field) == value  # each step goes towards run 2
    assert len({c.name for c in runs.values()}) == len(runs)  # distinct names


def test_cv5_folds():
    runs = configs.get_configs("cv5")
    assert list(runs) == [f"fold{i}" for i in range(5)]
    assert [c.fold for c in runs.values()] == [0, 1, 2, 3, 4]
    for config in runs.values():
        assert config.split == "fold" and config.num_folds == 5
        assert config.source == "lgg" and config.dataset_config == "baseline"
        assert (config.batch_size, config.learning_rate, config.weight_decay) == (16, 1e-4, 0.0)
        assert config.sampling == "weighted" and config.loss == "dice"
    fold0 = runs["fold0"]
    for config in runs.values():
        assert set(_differences(config, fold0)) <= {"fold"}


def test_smoke_and_cpu_quick_are_small():
    smoke = configs.get_config("smoke")
    assert smoke.source == "synthetic" and smoke.synthetic_patients <= 16
    assert smoke.features <= 8 and smoke.image_size <= 256 and smoke.batch_size == 8
    assert smoke.schedule == "cosine" and smoke.loss in ("dice", "bce_dice")
    assert smoke.epochs <= 10
    quick = configs.get_config("cpu_quick")
    assert quick.source == "lgg" and quick.image_size == 128 and quick.features == 16
    assert quick.batch_size == 16 and quick.schedule == "cosine" and quick.warmup_epochs > 0
    assert quick.learning_rate == pytest.approx(1e-3) and quick.weight_decay == 1e-4
    assert quick.sampling == "weighted" and 1 <= quick.epochs <= 16


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        configs.load("run3")
    message = str(err.value)
    assert "run3" in message
    for name in configs.EXPERIMENTS:
        assert name in message
    with pytest.raises(ValueError):
        configs.get_config("nope")
