"""--hvp-method, --basis-device and --basis-dtype on ``diagnose`` and ``bound``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tanh_classifier

from flatlens.cli._main import main
from flatlens.cli._parser import build_parser
from flatlens.report._diagnose import DiagnoseConfig


def _call(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(tanh_classifier(64, 10).state_dict(), path)
    return str(path)


def test_bound_with_difference_products_and_a_float64_cpu_basis(checkpoint, tmp_path, capsys):
    reports = {}
    for name, extra in (
        ("exact", []),
        ("difference", ["--hvp-method", "finite_difference", "--basis-device", "cpu"]),
        ("basis", ["--basis-dtype", "float64"]),
    ):
        argv = ["bound", "--model", "helpers:tanh_classifier", "--checkpoint", checkpoint]
        argv += ["--steps", "2", "--samples", "64", "--out", str(tmp_path / name)]
        code, out, err = _call([*argv, "--json", "--quiet", *extra], capsys)
        assert code == 0, err
        reports[name] = json.loads(out)
    lam = reports["exact"]["lambda_max"]
    assert reports["difference"]["lambda_max"] == pytest.approx(lam, rel=1e-3)
    assert reports["basis"]["lambda_max"] == pytest.approx(lam, rel=1e-3)


def test_the_flags_reach_the_diagnose_config_and_are_checked(checkpoint, capsys):
    parser = build_parser()
    args = parser.parse_args(
        ["diagnose", "--model", "mlp", "--checkpoint", checkpoint, "--hvp-method",
         "finite_difference", "--basis-device", "cpu", "--basis-dtype", "bfloat16"]
    )  # fmt: skip
    assert (args.hvp_method, args.basis_device, args.basis_dtype) == (
        "finite_difference",
        "cpu",
        "bfloat16",
    )
    config = DiagnoseConfig(hvp_method="finite_difference", basis_dtype="bfloat16")
    assert config.basis == {"basis_device": None, "basis_dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="floating torch dtype"):
        DiagnoseConfig(basis_dtype="int8")
    code, _, err = _call(
        ["bound", "--model", "mlp", "--checkpoint", checkpoint, "--basis-dtype", "int8"], capsys
    )
    assert code == 2 and "--basis-dtype" in err and "Traceback" not in err
    code, _, err = _call(
        ["bound", "--model", "mlp", "--checkpoint", checkpoint, "--hvp-method", "jvp"], capsys
    )
    assert code == 2 and "--hvp-method" in err
