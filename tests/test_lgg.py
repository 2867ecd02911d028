"""unet_jax.lgg: slice names, hidden entries and the data.csv key, on hand-checked cases.

The patient splits (holdout, folds) are tested against the baseline's own sampling in
test_lgg_dataset.py, where the builder uses them.
"""

import pytest

from unet_jax import lgg


@pytest.mark.parametrize(
    "stem, expected",
    [
        ("TCGA_CS_4941_19960909_12", ("TCGA_CS_4941_19960909", 12, False)),
        ("TCGA_CS_4941_19960909_12_mask", ("TCGA_CS_4941_19960909", 12, True)),
        ("P_1", ("P", 1, False)),
        ("P_007_mask", ("P", 7, True)),  # numbers compare as integers
        ("scan", ("scan", None, False)),
        ("scan_mask", ("scan", None, True)),
        ("_3", ("_3", None, False)),  # no volume name before the number
    ],
)
def test_parse_slice_stem(stem, expected):
    assert lgg.parse_slice_stem(stem) == expected


def test_hidden_entries_and_csv_key():
    assert lgg.is_hidden(".DS_Store") and lgg.is_hidden("__MACOSX")
    assert not lgg.is_hidden("TCGA_CS_4941_19960909")
    assert lgg.csv_key("TCGA_CS_4941_19960909") == "TCGA_CS_4941"
    assert lgg.csv_key("TCGA_CS_4941") == "TCGA_CS"  # the date is any trailing number
    assert lgg.csv_key("nodate") == "nodate"


def test_split_of_fewer_than_two_patients_is_refused():
    with pytest.raises(lgg.LGGDataError, match="at least 2 patients"):
        lgg.split_patients(["only"])
