"""The command line's names: one flag per radius, old flags working for one release, and the
defaults ``diagnose --help`` prints being the ones it uses."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from flatlens.cli._commands import DIAGNOSE_SETTINGS
from flatlens.cli._main import main
from flatlens.cli._parser import build_parser
from flatlens.cli._training import _train_config
from flatlens.report._diagnose import DiagnoseConfig
from flatlens.zoo import mlp


def _train_args(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_each_radius_has_its_own_train_flag():
    config = _train_config(
        _train_args("--sam-rho", "0.1", "--gam-rho", "0.3", "--measure-rho", "0.02"), "gam"
    )
    assert (config.sam_rho, config.gam_rho, config.measure_rho) == (0.1, 0.3, 0.02)
    assert config.gam_kwargs() == {"rho": 0.3}  # GAM's own defaults for the rest
    config = _train_config(
        _train_args("--gam-perturb-rho", "0.03", "--gam-minus-weight", "0.5"), "gam"
    )
    assert config.gam_kwargs() == {"rho": 0.2, "perturb_rho": 0.03, "minus_weight": 0.5}
    defaults = _train_config(_train_args(), "sgd")
    assert (defaults.sam_rho, defaults.gam_rho, defaults.measure_rho) == (0.05, 0.2, 0.05)


def test_the_old_rho_flag_sets_the_three_radii_it_used_to_and_says_so(capsys):
    args = _train_args("--rho", "0.07", "--gam-rho", "0.4")
    assert "--rho is deprecated" in capsys.readouterr().err
    config = _train_config(args, "sam")
    # An explicit new flag wins over the old catch-all.
    assert (config.sam_rho, config.gam_rho, config.measure_rho) == (0.07, 0.4, 0.07)


@pytest.mark.parametrize(
    ("command", "old", "new", "value", "dest"),
    [
        ("bound", "--rho", "--measure-rho", "0.05,0.01", "measure_rho"),
        ("diagnose", "--rho", "--measure-rho", "0.05", "measure_rho"),
        ("landscape", "--steps", "--num-points", "7", "num_points"),
    ],
)
def test_old_flags_still_parse_and_name_the_new_one(command, old, new, value, dest, capsys):
    base = [command, "--model", "mlp", "--checkpoint", "model.pt"]
    parser = build_parser()
    by_old = parser.parse_args([*base, old, value])
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and new in err
    by_new = parser.parse_args([*base, new, value])
    assert getattr(by_old, dest) == getattr(by_new, dest)


def test_diagnose_help_shows_the_defaults_it_uses():
    """The help text states each measure setting's default; they are DiagnoseConfig's."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["diagnose"]
    helps = {a.dest: a.help for a in sub._actions}
    defaults = DiagnoseConfig()
    quick = defaults.quick()
    for field, flag in DIAGNOSE_SETTINGS.items():
        text = helps[flag]
        shown = re.search(r"default: ([0-9.]+)", text)
        assert shown, (flag, text)
        assert float(shown.group(1)) == float(getattr(defaults, field)), flag
        fast = re.search(r"--quick: ([0-9.]+)", text)
        if fast:
            assert float(fast.group(1)) == float(getattr(quick, field)), flag


def test_diagnose_flags_reach_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(model, data, out, *, config, **kwargs):
        seen["config"] = config
        return {"summary": {}, "reused_parts": []}

    monkeypatch.setattr("flatlens.report._diagnose.diagnose", fake)
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), tmp_path / "m.pt")
    argv = ["diagnose", "--model", "mlp", "--checkpoint", str(tmp_path / "m.pt")]
    argv += ["--out", str(tmp_path / "d"), "--quiet", "--quick", "--steps", "6"]
    argv += ["--trace-probes", "12", "--plane-points", "0", "--span", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    config = seen["config"]
    quick = DiagnoseConfig().quick()
    assert (config.steps, config.trace_probes) == (6, 12)
    assert (config.landscape_2d, config.landscape_span) == (0, 0.5)
    assert config.lanczos_steps == quick.lanczos_steps  # --quick for what was not given
    assert (
        dataclasses.replace(
            config,
            steps=quick.steps,
            trace_probes=quick.trace_probes,
            landscape_2d=quick.landscape_2d,
            landscape_span=1.0,
        )
        == quick
    )
