"""flatlens.train._compare: the study table, Kendall's tau against scipy, the plot."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from scipy.stats import kendalltau

from flatlens.data import synthetic_classification
from flatlens.train import TrainConfig, compare, train
from flatlens.train._compare import kendall_tau

DATA = synthetic_classification(
    80, num_features=5, num_classes=3, num_test=40, seed=2, dtype=torch.float64
)
BASE = TrainConfig(
    model="mlp",
    model_kwargs={"hidden": 6, "depth": 1},
    epochs=2,
    batch_size=16,
    lr=0.1,
    dtype="float64",
    trace_probes=9,
)


@pytest.fixture(scope="module")
def study():
    return compare(
        DATA,
        ["sgd", "sam"],
        seeds=[0, 1],
        config=BASE,
        measures=("lambda_max", "trace"),
    )


def test_runs_are_the_trainers_runs(study):
    assert [(r["optimizer"], r["seed"]) for r in study.runs] == [
        ("sgd", 0),
        ("sgd", 1),
        ("sam", 0),
        ("sam", 1),
    ]
    alone = train(
        TrainConfig(
            **{
                **BASE.__dict__,
                "optimizer": "sam",
                "seed": 1,
                "measure_every": 2,
                "measures": ("lambda_max", "trace"),
            }
        ),
        DATA,
    ).final
    row = study.runs[3]
    for key in ("test_acc", "gap_loss", "gap_acc", "lambda_max", "trace"):
        assert row[key] == alone[key], key


def test_a_factory_model_is_trained_like_a_zoo_model():
    base = TrainConfig(
        **{**BASE.__dict__, "model": "helpers:tanh_classifier", "model_kwargs": {"hidden": 4}}
    )
    factory_study = compare(DATA, ["sgd"], seeds=[0, 1], config=base, measures=("trace",))
    assert [(r["optimizer"], r["seed"]) for r in factory_study.runs] == [("sgd", 0), ("sgd", 1)]
    alone = train(
        TrainConfig(**{**base.__dict__, "seed": 1, "measure_every": 2, "measures": ("trace",)}),
        DATA,
    )
    assert alone.model[1].weight.shape == (4, 5)
    for key in ("test_acc", "gap_loss", "gap_acc", "trace"):
        assert factory_study.runs[1][key] == alone.final[key], key
    # Different seeds give different initial weights, so different runs.
    assert factory_study.runs[0]["train_loss"] != factory_study.runs[1]["train_loss"]


def test_summary_and_kendall_tau(study):
    for entry in study.summary:
        mine = [r for r in study.runs if r["optimizer"] == entry["optimizer"]]
        assert entry["gap_loss_mean"] == pytest.approx(
            statistics.fmean(r["gap_loss"] for r in mine)
        )
        assert entry["lambda_max_std"] == pytest.approx(
            statistics.stdev(r["lambda_max"] for r in mine)
        )
    for measure in ("lambda_max", "trace"):
        for gap in ("gap_loss", "gap_acc"):
            xs = [r[measure] for r in study.runs]
            ys = [r[gap] for r in study.runs]
            got = study.kendall[measure][gap]
            if len(set(ys)) < 2:
                assert got["tau"] is None
            else:
                expected = kendalltau(xs, ys)
                assert got["tau"] == pytest.approx(expected.statistic)
                assert got["p_value"] == pytest.approx(expected.pvalue)
    assert set(study.kendall) == {"lambda_max", "trace"}


def test_table_plot_and_json(study, tmp_path):
    text = study.table()
    assert "Kendall's tau" in text and "lambda_max" in text
    assert text.count("\nsgd") == 3 and text.count("\nsam") == 3  # two seeds and the mean
    markdown = study.table(markdown=True)
    assert markdown.startswith("| optimizer")
    fig = study.plot(tmp_path / "new" / "study.png")
    assert len(fig.axes) == 2
    assert (tmp_path / "new" / "study.png").stat().st_size > 0
    assert [ax.get_xlabel() for ax in fig.axes] == ["lambda_max", "trace"]
    with pytest.raises(ValueError, match="gap"):
        study.plot(gap="gap")
    json.dumps(study.to_dict(), allow_nan=False)


def test_kendall_tau_helper():
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])["tau"] == pytest.approx(
        kendalltau([1, 2, 3, 4], [1, 3, 2, 4]).statistic
    )
    assert kendall_tau([1, 2, 3], [5, 5, 5])["tau"] is None
    assert kendall_tau([1, None, 3, 4, 5], [1, 2, 3, float("nan"), 0])["n"] == 3
    assert kendall_tau([1, 2], [1, 2])["tau"] is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizers": []}, ValueError, "empty"),
        ({"optimizers": "sgd"}, TypeError, "list of names"),
        ({"optimizers": {"a": 3}}, TypeError, "TrainConfig"),
        ({"seeds": [0, 0]}, ValueError, "distinct"),
        ({"measures": ("sharpness",)}, ValueError, "unknown measures"),
        ({"optimizers": ["lion"]}, ValueError, "optimizer"),
    ],
)
def test_bad_study_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        compare(DATA, config=BASE, **kwargs)
