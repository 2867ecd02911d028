"""unet_jax.config: type coercion of overrides (as from ``--set key=value``), unknown keys, the
dict / JSON round trip, and the validation of every field when a config is built (issue 15), against
hand-checked cases, the modules whose constraints the rules state, and the command line."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import configs
from unet_jax.config import Config, ConfigError, choices, field_names, override, validate

REPO = Path(__file__).resolve().parent.parent


def test_field_names_are_every_field_sorted():
    names = field_names()
    assert names == sorted(names)
    assert set(names) == {f.name for f in dataclasses.fields(Config)}
    assert {"name", "features", "batch_size", "synthetic_slices", "grad_clip"} <= set(names)


def test_strings_are_coerced_to_the_field_types():
    c = override(
        Config(),
        {
            "features": "8",
            "learning_rate": "3e-3",
            "name": "x",
            "synthetic_slices": "(4, 6)",
            "write_report": "false",
        },
    )
    assert c.features == 8 and type(c.features) is int
    assert c.learning_rate == 0.003 and type(c.learning_rate) is float
    assert c.name == "x"
    assert c.synthetic_slices == (4, 6)
    assert c.write_report is False
    assert override(Config(), {"synthetic_slices": "[3,5]"}).synthetic_slices == (3, 5)
    assert override(Config(), {"synthetic_slices": [5, "7"]}).synthetic_slices == (5, 7)


@pytest.mark.parametrize(
    "text, want",
    [("1", True), ("true", True), ("Yes", True), ("0", False), ("FALSE", False), ("no", False)],
)
def test_boolean_strings(text, want):
    assert override(Config(), {"write_report": text}).write_report is want


def test_optional_fields_take_none_or_the_inner_type():
    c = override(Config(), {"grad_clip": "1.5", "data_dir": "/d"})
    assert c.grad_clip == 1.5 and c.data_dir == "/d"
    for none in ("none", "None", "null", None):
        assert override(c, {"grad_clip": none}).grad_clip is None
    # A non-optional field takes the text "none" as its value, not as None.
    assert override(Config(), {"name": "none"}).name == "none"


def test_integers_and_floats():
    assert override(Config(), {"features": 16.0}).features == 16
    assert override(Config(), {"learning_rate": 1}).learning_rate == 1.0
    with pytest.raises(ValueError, match="features.*integer"):
        override(Config(), {"features": 2.5})
    with pytest.raises(ValueError, match="features.*int"):
        override(Config(), {"features": "eight"})
    with pytest.raises(ValueError, match="write_report.*boolean"):
        override(Config(), {"write_report": "maybe"})


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bogus', 'nope'\]") as e:
        override(Config(), {"nope": 1, "bogus": 2, "features": 4})
    assert "valid keys: " + ", ".join(field_names()) in str(e.value)
    with pytest.raises(ValueError, match="bogus"):
        Config.from_dict({"bogus": 1})


def test_replace_is_a_type_checked_copy():
    base = Config(name="a")
    c = base.replace(batch_size="4", epochs=3)
    assert (c.batch_size, c.epochs, c.name) == (4, 3, "a")
    assert base.batch_size == 16  # frozen: the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.features = 8  # type: ignore[misc]
    assert override(base, {}) == base


def test_dict_and_json_round_trip():
    c = Config(name="rt", features=8, grad_clip=2.0, synthetic_slices=(3, 9), write_report=False)
    d = c.to_dict()
    assert d["synthetic_slices"] == (3, 9) and d["grad_clip"] == 2.0
    assert Config.from_dict(d) == c
    text = c.to_json()
    assert list(json.loads(text)) == field_names()  # sorted keys
    # JSON turns the tuple into a list; from_dict turns it back.
    assert Config.from_dict(json.loads(text)) == c
    assert Config.from_dict({}) == Config()


# ----------------------------------------------------------------------------- validation

#: The settings the issue lists, as typed on the command line (``--set field=value``).
ISSUE_CASES = [
    ("batch_size", "0"),
    ("features", "0"),
    ("image_size", "0"),
    ("eval_every_epochs", "0"),
    ("log_every_steps", "0"),
    ("image_size", "50"),
    ("in_channels", "1"),
    ("loss", "foo"),
    ("schedule", "foo"),
    ("sampling", "foo"),
    ("split", "foo"),
    ("source", "foo"),
    ("dataset_config", "foo"),
    ("fold", "7"),
    ("num_folds", "1"),
    ("threshold", "2"),
    ("epochs", "0"),
    ("epochs", "-1"),
    ("keep_latest", "0"),
    ("dtype", "float16"),
]

#: Every other rule's edge: (field, value, other settings applied with it).
MORE_CASES = [
    ("name", "", {}),
    ("name", "   ", {}),
    ("synthetic_patients", "1", {}),
    ("synthetic_patients", "9001", {}),
    ("synthetic_slices", "0,4", {"dataset_config": "raw"}),
    ("synthetic_slices", "5,4", {}),
    ("synthetic_slices", "2,4", {"dataset_config": "baseline"}),
    ("synthetic_slices", "4", {}),
    ("synthetic_slices", "4,5,6", {}),
    ("image_size", "8", {}),
    ("image_size", "264", {}),
    ("image_size", "-16", {}),
    ("num_folds", "111", {"split": "fold"}),
    ("num_folds", "4", {"split": "fold", "source": "synthetic", "synthetic_patients": "3"}),
    ("fold", "3", {"split": "fold", "num_folds": "3"}),
    ("fold", "-1", {}),
    ("device_memory_budget_gb", "0", {}),
    ("device_memory_budget_gb", "-2", {}),
    ("aug_scale", "-0.1", {}),
    ("aug_scale", "1", {}),
    ("aug_angle", "-5", {}),
    ("aug_angle", "inf", {}),
    ("aug_flip", "1.5", {}),
    ("aug_flip", "-0.5", {}),
    ("out_channels", "2", {}),
    ("features", "-8", {}),
    ("dtype", "float64", {}),
    ("learning_rate", "0", {}),
    ("learning_rate", "-0.001", {}),
    ("learning_rate", "nan", {}),
    ("learning_rate", "inf", {}),
    ("weight_decay", "-0.0001", {}),
    ("warmup_epochs", "-0.5", {}),
    ("warmup_epochs", "3", {"epochs": "2"}),
    ("final_lr_fraction", "1.5", {}),
    ("final_lr_fraction", "-0.1", {}),
    ("grad_clip", "0", {}),
    ("grad_clip", "-1", {}),
    ("seed", "-1", {}),
    ("seed", str(2**32), {}),
    ("epoch_loop", "gpu", {}),
    ("pack_mode", "pmap", {}),
    ("threshold", "0", {}),
    ("threshold", "1", {}),
    ("checkpoint_every_steps", "-1", {}),
    ("batch_size", "-4", {}),
]


def _assert_one_line_naming(error: pytest.ExceptionInfo, field: str, value: str) -> str:
    message = str(error.value)
    assert error.type is ConfigError and isinstance(error.value, ValueError)
    assert "\n" not in message and message.strip() == message
    assert message.startswith(f"config key {field!r} = "), message
    # The value as given (its coerced form contains it: "2" -> 2.0, "3,4" -> (3, 4)).
    assert value.replace(" ", "") in message.replace(" ", ""), message
    assert ": must be " in message, message  # what is allowed
    return message


@pytest.mark.parametrize("field, value", ISSUE_CASES)
def test_the_issues_settings_are_refused_in_one_line(field, value):
    with pytest.raises(ConfigError) as error:
        override(Config(), {field: value})
    _assert_one_line_naming(error, field, value)


@pytest.mark.parametrize("field, value, context", MORE_CASES)
def test_every_rule_refuses_its_edge(field, value, context):
    with pytest.raises(ConfigError) as error:
        override(Config(), {**context, field: value})
    _assert_one_line_naming(error, field, value)


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 16},
        {"image_size": 48},
        {"image_size": 64},
        {"image_size": 512},
        {"threshold": 0.01},
        {"threshold": 0.99},
        {"aug_flip": 0.0, "aug_scale": 0.0, "aug_angle": 0.0},
        {"aug_flip": 1.0, "aug_scale": 0.99, "aug_angle": 180.0},
        {"checkpoint_every_steps": 0, "keep_latest": 1},
        {"grad_clip": None, "device_memory_budget_gb": None},
        {"grad_clip": 1e-3, "device_memory_budget_gb": 0.5},
        {"epochs": 1, "warmup_epochs": 1.0, "final_lr_fraction": 1.0},
        {"epochs": 3, "warmup_epochs": 0, "final_lr_fraction": 0.0, "schedule": "cosine"},
        {"weight_decay": 0.0, "learning_rate": 1},
        {"split": "fold", "num_folds": 2, "fold": 1},
        {"split": "fold", "num_folds": 110, "fold": 109},
        {"split": "fold", "source": "synthetic", "synthetic_patients": 2, "num_folds": 2},
        # Without split="fold" the folds are not used: more folds than synthetic patients is fine.
        {"source": "synthetic", "synthetic_patients": 3, "num_folds": 5},
        {"synthetic_patients": 9000},
        {"synthetic_slices": (3, 3), "dataset_config": "baseline"},
        {"synthetic_slices": (1, 1), "dataset_config": "raw"},
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"dtype": "bfloat16", "epoch_loop": "device", "pack_mode": "vmap", "pack_runs": True},
        {"epoch_loop": "host", "pack_mode": "unroll", "sampling": "shuffle", "loss": "bce_dice"},
        {"name": "a b", "source": "synthetic", "dataset_config": "raw"},
    ],
)
def test_edge_values_that_work_are_accepted(changes):
    config = Config(**changes)
    for field, value in changes.items():
        assert getattr(config, field) == value
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_every_way_of_building_a_config_validates():
    ways = [
        lambda: Config(batch_size=0),
        lambda: Config().replace(batch_size=0),
        lambda: Config().replace(batch_size="0"),
        lambda: override(Config(), {"batch_size": "0"}),
        lambda: Config.from_dict({"batch_size": 0}),
        lambda: dataclasses.replace(Config(), batch_size=0),
    ]
    for build in ways:
        with pytest.raises(
            ConfigError, match=r"^config key 'batch_size' = 0: must be an integer >= 1$"
        ):
            build()


def test_direct_construction_checks_the_types():
    """``Config(...)`` does not coerce (``override`` does), so wrong types are refused."""
    for field, value, allowed in [
        ("features", "8", "an integer"),
        ("features", 8.0, "an integer"),
        ("features", True, "an integer"),
        ("learning_rate", "1e-3", "a number"),
        ("name", 3, "a string"),
        ("write_report", "no", "a boolean"),
        ("pack_runs", 1, "a boolean"),
        ("grad_clip", "1", "None or a number"),
        ("data_dir", 3, "None or a string"),
        ("synthetic_slices", [16, 24], "a tuple of integers"),
        ("synthetic_slices", (16.0, 24), "a tuple of integers"),
    ]:
        with pytest.raises(ConfigError) as error:
            Config(**{field: value})
        message = _assert_one_line_naming(error, field, repr(value))
        assert message.endswith(f"must be {allowed}") or f"must be {allowed} " in message, message


@pytest.mark.parametrize(
    "field, value",
    [
        ("features", "eight"),
        ("features", 2.5),
        ("features", float("inf")),
        ("features", True),
        ("learning_rate", "fast"),
        ("write_report", "maybe"),
        ("synthetic_slices", 5),
        ("synthetic_slices", "a,b"),
        ("grad_clip", "off"),
    ],
)
def test_values_that_cannot_be_read_are_refused_in_one_line(field, value):
    with pytest.raises(ConfigError) as error:
        override(Config(), {field: value})
    message = str(error.value)
    assert "\n" not in message and f"config key {field!r} = " in message, message


def test_the_reasons_are_given_where_the_rule_is_not_obvious():
    def message(**changes):
        with pytest.raises(ConfigError) as error:
            override(Config(), changes)
        return str(error.value)

    float16 = message(dtype="float16")
    assert "'float32', 'bfloat16'" in float16 and "DSC 0.017" in float16
    assert "underflow" in float16 and "bfloat16 is the half-precision option" in float16
    assert "3 channels" in message(in_channels="1")
    assert "multiple of 16" in message(image_size="50")
    assert "resume" in message(keep_latest="0")
    assert "0..4 (num_folds = 5)" in message(fold="7")
    assert "LGG data has 110" in message(split="fold", num_folds="111")
    assert "synthetic_patients = 3" in message(
        split="fold", source="synthetic", synthetic_patients="3", num_folds="4"
    )
    assert "first and last slice" in message(synthetic_slices="2,9")
    assert "<= epochs (2)" in message(epochs="2", warmup_epochs="2.5")


def test_every_field_is_validated_by_type_and_all_but_free_ones_by_rules():
    from unet_jax.config import RULES

    # Free-form (any path, any boolean): only their type is checked.
    type_only = {"data_dir", "manual_dir", "pack_runs", "write_report"}
    assert set(RULES) | type_only == set(field_names())
    assert not set(RULES) & type_only


def test_every_experiment_config_is_valid():
    for name in configs.EXPERIMENTS:
        for run, config in configs.get_configs(name).items():
            validate(config)
            assert Config.from_dict(json.loads(config.to_json())) == config, (name, run)


def test_the_test_helpers_config_is_valid():
    from _synth import tiny_config

    validate(tiny_config("t", epochs=1, eval_every_epochs=2, log_every_steps=1, seed=3))


# ------------------------------------------ the rules agree with the code that uses the values


def test_choices_are_the_names_the_code_accepts():
    import jax.numpy as jnp

    from unet_jax.input_pipeline import SamplerSpec
    from unet_jax.losses import LOSSES, get_loss
    from unet_jax.preprocess import MODES
    from unet_jax.train import execution_path
    from unet_jax.train_steps import make_schedule

    assert set(choices("loss")) == set(LOSSES)
    for name in choices("loss"):
        get_loss(name)
    assert set(choices("dataset_config")) == set(MODES)
    for schedule in choices("schedule"):
        assert make_schedule(Config(schedule=schedule), 10)(0) >= 0
    for sampling in choices("sampling"):
        SamplerSpec(10, 2, sampling)
    for loop in choices("epoch_loop"):
        path = execution_path(Config(epoch_loop=loop), streaming=False, packed=False)
        assert path["epoch_loop"] in ("device", "host")
    for mode in choices("pack_mode"):
        assert execution_path(Config(pack_mode=mode), streaming=False, packed=True)["pack_mode"]
    for dtype in choices("dtype"):
        jnp.dtype(dtype)
    assert choices("features") == ()


def test_sources_are_the_data_sources(tmp_path):
    from unet_jax.data import configured_data_dir

    assert set(choices("source")) == {"lgg", "synthetic"}
    for source in choices("source"):
        configured_data_dir(Config(source=source), tmp_path)


def test_image_sizes_are_the_ones_the_model_takes():
    """A size is valid for the config exactly when the U-Net runs on it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unet_jax.model import UNet

    model = UNet(3, 1, 1, rngs=nnx.Rngs(0))
    model.eval()

    def model_takes(size: int) -> bool:
        try:
            out = jax.eval_shape(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        except ValueError:
            return False
        assert out.shape == (1, size, size, 1)
        return True

    def config_takes(size: int) -> bool:
        try:
            Config(image_size=size)
        except ConfigError:
            return False
        return True

    verdicts = {size: config_takes(size) for size in (8, 16, 24, 40, 48, 50, 64, 72, 96, 100)}
    assert verdicts[48] and verdicts[64] and not verdicts[50]
    for size, ok in verdicts.items():
        assert model_takes(size) == ok, size


def test_synthetic_slices_minimum_is_what_the_preprocessing_needs():
    import numpy as np

    from unet_jax.preprocess import prepare_volume
    from unet_jax.synthetic import synthetic_volume

    for mode in choices("dataset_config"):
        for n in (1, 2, 3):
            images, masks = synthetic_volume(np.random.default_rng(n), n, 32)
            try:
                prepare_volume(images, masks, mode, size=32)
                prepared = True
            except ValueError:
                prepared = False
            try:
                Config(dataset_config=mode, synthetic_slices=(n, n))
                valid = True
            except ConfigError:
                valid = False
            assert prepared == valid, (mode, n)


# ----------------------------------------------------------------------------- command line


def test_a_bad_setting_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "wd"
    env = {**os.environ, "UNET_JAX_COMPILE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--exp=smoke",
            "--set",
            "batch_size=0",
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "batch_size" in lines[0] and "= 0" in lines[0] and ">= 1" in lines[0]
    assert not result.stdout  # the resolved config is not even printed
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no workdir, no cache folder


def test_execution_only_fields_are_marked_once_in_the_field_metadata():
    from unet_jax.config import EXECUTION, execution_fields

    marked = execution_fields()
    assert list(marked) == [f.name for f in dataclasses.fields(Config) if f.metadata.get(EXECUTION)]
    assert {
        "pack_runs",
        "pack_mode",
        "keep_latest",
        "data_dir",
        "epoch_loop",
        "log_every_steps",
        "write_report",
    } <= set(marked)
    # What changes the trained numbers or the run's result is never execution-only (epochs: a
    # resume with other epochs is refused, a longer run is another run).
    computes = {"name", "seed", "source", "dataset_config", "synthetic_patients", "split", "fold",
                "image_size", "features", "dtype", "batch_size", "epochs", "learning_rate",
                "schedule", "aug_flip", "sampling", "loss", "eval_every_epochs", "threshold"}  # fmt: skip
    assert not computes & set(marked)
    # The marking keeps the defaults.
    assert Config().keep_latest == 2 and Config().write_report is True
    assert Config().data_dir is None and Config().epoch_loop == "auto"


def test_packable_runs_differ_only_in_name_seed_and_execution_fields():
    from unet_jax.config import execution_fields, packable

    base = Config(name="a", seed=0, pack_runs=True)
    seeds = [base.replace(name=f"a-seed{s}", seed=s) for s in (0, 1, 2)]
    assert packable(seeds) and packable([base]) and packable([])
    assert not packable([seeds[0], seeds[1].replace(learning_rate=1e-3)])
    assert not packable([seeds[0], seeds[1].replace(epochs=50)])
    # An execution-only difference (where the data lies, how it is logged or dispatched) packs.
    other = {
        "data_dir": "/elsewhere",
        "epoch_loop": "host",
        "log_every_steps": 3,
        "write_report": False,
        "keep_latest": 4,
        "pack_mode": "unroll",
    }
    assert set(other) <= set(execution_fields())
    for key, value in other.items():
        assert packable([seeds[0], seeds[1].replace(**{key: value})]), key
    # Synthetic data is generated from the seed: runs of different seeds read different data.
    synth = [c.replace(source="synthetic", split="fold", num_folds=4) for c in seeds]
    assert not packable(synth) and not packable(synth[:2])
    assert packable([synth[0], synth[0].replace(name="twin", log_every_steps=1)])
