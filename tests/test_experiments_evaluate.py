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


def _tiny_checkpoint(path, **fields):
    """A model-only checkpoint of a 2-feature U-Net whose config has ``fields``; its values
    drawn with NumPy into the shape-only model (no JAX initialisation to compile)."""
    import jax
    import numpy as np

    from unet_jax.checkpoint import save_model_checkpoint
    from unet_jax.config import Config
    from unet_jax.model import abstract_model, load_pure, model_to_pure

    config = Config(name="tiny", features=2, image_size=16, **fields)
    model = abstract_model(config)
    rng = np.random.default_rng(0)
    shapes = model_to_pure(model)
    load_pure(model, jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes))
    return save_model_checkpoint(path, model, config)


def test_members_trained_on_different_data_are_refused_in_either_order(tmp_path, capsys):
    # The patients scored are the members' validation split: members of different data sets
    # (another source, another fold, other synthetic data) have none in common. One line naming
    # both members and the field(s), exit 2, whichever comes first; nothing is evaluated.
    lgg = _tiny_checkpoint(tmp_path / "lgg", split="fold", fold=0)
    cases = [
        (_tiny_checkpoint(tmp_path / "fold1", split="fold", fold=1), "fold 0 vs 1", "fold 1 vs 0"),
        (
            _tiny_checkpoint(tmp_path / "synth", split="fold", source="synthetic"),
            "source 'lgg' vs 'synthetic'",
            "source 'synthetic' vs 'lgg'",
        ),
    ]
    for other, forward, backward in cases:
        for a, b, field in [(lgg, other, forward), (other, lgg, backward)]:
            out = tmp_path / "out"
            code = main(["--checkpoint", str(a), "--checkpoint", str(b), "--out", str(out)])
            captured = capsys.readouterr()
            err = captured.err.strip().splitlines()
            assert code == 2, captured
            assert len(err) == 1 and err[0].startswith("error: members "), err
            assert f"{a} and {b}" in err[0] and "trained on different data" in err[0], err
            assert f"({field})" in err[0] and "unet_jax.predict" in err[0], err
            assert not out.exists() and captured.out == ""


def test_which_fields_say_the_data_set():
    # Synthetic data is generated from the seed and sizes, a fold split from fold and num_folds;
    # for real data with the holdout split those fields say nothing of the patients.
    from experiments.evaluate import check_same_data
    from unet_jax.config import Config
    from unet_jax.predict import PredictError

    def refused(a: dict, b: dict) -> str | None:
        try:
            check_same_data([("A", Config(**a)), ("B", Config(**b))])
        except PredictError as e:
            return str(e)
        return None

    assert refused({"seed": 1, "fold": 1}, {"seed": 2, "fold": 3}) is None  # lgg, holdout
    assert "(split 'holdout' vs 'fold')" in refused({}, {"split": "fold"})
    assert "(num_folds 5 vs 4)" in refused(
        {"split": "fold", "num_folds": 5}, {"split": "fold", "num_folds": 4}
    )
    assert "(dataset_config 'baseline' vs 'raw')" in refused({}, {"dataset_config": "raw"})
    synthetic = {"source": "synthetic", "synthetic_patients": 6, "synthetic_slices": (8, 10)}
    assert "(seed 1 vs 2)" in refused({**synthetic, "seed": 1}, {**synthetic, "seed": 2})
    message = refused(synthetic, {**synthetic, "synthetic_patients": 7, "synthetic_slices": (8, 9)})
    assert "(synthetic_patients 6 vs 7, synthetic_slices (8, 10) vs (8, 9))" in message
    assert message.startswith("members A and B were trained on different data")
    # The first member is compared with each of the others: the odd one out is named.
    three = [("A", Config()), ("B", Config()), ("C", Config(split="fold"))]
    with pytest.raises(PredictError, match="members A and C"):
        check_same_data(three)


def test_a_step_that_does_not_exist_names_those_that_do(tmp_path, capsys):
    import jax.numpy as jnp

    from unet_jax.checkpoint import TrainCheckpoints, load_model
    from unet_jax.model import model_to_pure

    model, config, _ = load_model(_tiny_checkpoint(tmp_path / "m"))
    ckpts = TrainCheckpoints(tmp_path / "run", keep_latest=1)
    for step, metric in [(114, 0.6), (152, 0.5)]:
        meta = {"epoch": step, "metrics": {"val_dsc": metric}}
        opt = {"step": jnp.asarray(step, jnp.int32)}
        if step == 114:  # the better one
            ckpts.save_best(step, model_to_pure(model), config, meta, metric)
        ckpts.save_latest(step, model_to_pure(model), opt, config, meta)
    ckpts.close()
    run = (tmp_path / "run").absolute()
    assert main(["--checkpoint", str(run), "--step", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: no checkpoint for step 999 under {run} (steps: 152 (latest), 114 (best))"
    ]
