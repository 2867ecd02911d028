"""`python -m experiments.evaluate`: checkpoints alone and as ensembles, with and without TTA, on
the smoke run (trained once per session, tests/conftest.py)."""

import json

import pytest

from experiments.evaluate import main
from unet_jax import rundata


@pytest.mark.slow
def test_evaluate_reproduces_the_run_and_ensembles_and_tta_are_what_they_say(
    smoke_workdir, tmp_path, capsys
):
    # The best checkpoint alone gives the run's own best evaluation (the same patients, the
    # same metrics at the stored size); an ensemble of that checkpoint with itself averages two
    # equal probabilities (the same masks, to float rounding at the threshold); TTA changes
    # the prediction (the smoke model is not mirror-symmetric) and says so in its summary.
    best = max(
        (r for r in map(json.loads, (smoke_workdir / "metrics.jsonl").read_text().splitlines())
         if r["type"] == "eval"),
        key=lambda r: r["val_dsc"],
    )  # fmt: skip
    outs = {}
    for name, extra in {
        "one": [],
        "pair": ["--checkpoint", str(smoke_workdir)],
        "tta": ["--tta"],
    }.items():
        code = main(["--checkpoint", str(smoke_workdir), *extra, "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        rows = rundata.read_per_patient(tmp_path / name / "per_patient.csv")
        outs[name] = (summary, {r["patient"]: r for r in rows})
    one, pair, tta = outs["one"], outs["pair"], outs["tta"]
    assert one[0]["val_dsc"] == pytest.approx(best["val_dsc"], abs=1e-6)
    assert one[0]["val_patients"] == best["val_patients"] and not one[0]["tta"]
    assert pair[0]["val_dsc"] == pytest.approx(one[0]["val_dsc"], abs=2e-3)
    assert tta[0]["tta"] and tta[1].keys() == one[1].keys()
    assert any(tta[1][p]["pred_pixels"] != one[1][p]["pred_pixels"] for p in one[1])
    printed = capsys.readouterr().out
    assert "ensemble of 2" in printed and "TTA" in printed


def test_members_must_share_their_preprocessing(smoke_workdir, tmp_path, capsys):
    # The ensemble check is predict's (one rule for both); a member at another input size is
    # refused in one line naming both and the field, exit 2; a missing checkpoint likewise.
    import shutil

    other = tmp_path / "other"
    shutil.copytree(smoke_workdir / "checkpoints", other / "checkpoints")
    config = json.loads((smoke_workdir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    for meta in (other / "checkpoints").rglob("meta/metadata"):
        data = json.loads(meta.read_text())
        data["config"]["image_size"] = 64
        meta.write_text(json.dumps(data))
    assert main(["--checkpoint", str(smoke_workdir), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_size 128 vs 64" in err[0] and str(other) in err[0]
    assert main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nothing" in err[0]
