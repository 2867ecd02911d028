"""unet_jax.config: type coercion of overrides (as from ``--set key=value``), unknown keys, and the
dict / JSON round trip, against hand-checked cases."""

import dataclasses
import json

import pytest

from unet_jax.config import Config, field_names, override


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
    assert override(Config(), {"synthetic_slices": "[2,3]"}).synthetic_slices == (2, 3)
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
