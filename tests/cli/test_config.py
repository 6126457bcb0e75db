"""Config parsing: defaults <- TOML file <- flags, and one-line errors (exit 2) for bad keys."""

import argparse
import tomllib

import pytest

from fastflow.cli import config
from fastflow.cli.errors import CLIError


def _args(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?")
    config.add_flags(p)
    return p.parse_args(list(argv))


def test_defaults_file_and_flag_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\nbatch_size = 64\nsteps = 7\n[model_args]\nhidden_features = 32\n')
    cfg = config.resolve(_args(str(f), "--batch-size", "128", "--model-arg", "num_bins=4")).config
    assert cfg["lr"] == 0.01  # file over default
    assert cfg["batch_size"] == 128  # flag over file
    assert cfg["steps"] == 7
    assert cfg["seed"] == config.BY_NAME["seed"].default  # untouched default
    # model defaults (nsf) <- file table <- flag items
    assert cfg["model_args"] == {**config.MODEL_DEFAULTS["nsf"], "hidden_features": 32, "num_bins": 4}


def test_bool_and_int_coercion():
    cfg = config.resolve(_args("--quiet", "--lr", "1", "--model", "maf")).config
    assert cfg["quiet"] is True and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["model_args"] == {}  # no defaults for maf: the builder's own


def test_model_arg_values_are_toml():
    assert config.parse_model_arg("a=64") == ("a", 64)
    assert config.parse_model_arg("a=1e-3") == ("a", 1e-3)
    assert config.parse_model_arg("a=true") == ("a", True)
    assert config.parse_model_arg("a=[8, 8]") == ("a", [8, 8])
    assert config.parse_model_arg("a=random") == ("a", "random")
    with pytest.raises(CLIError, match="KEY=VALUE"):
        config.parse_model_arg("novalue")


@pytest.mark.parametrize("text, match", [
    ("batch_sise = 3\n", r"unknown config key 'batch_sise'.*did you mean 'batch_size'"),
    ("lr = 'fast'\n", r"config key 'lr'.*expected a number"),
    ("steps = 1.5\n", r"config key 'steps'.*expected an integer"),
    ("steps = true\n", r"config key 'steps'.*expected an integer"),
    ("steps = 0\n", r"config key 'steps'.*must be >= 1"),
    ("lr = 0\n", r"config key 'lr'.*must be > 0"),
    ("optimizer = 'adamm'\n", r"config key 'optimizer'.*did you mean 'adam'"),
    ("lr = = 3\n", r"cannot parse config file"),
    ("val_fraction = 0.6\ntest_fraction = 0.5\n", r"'val_fraction' \+ 'test_fraction' must be < 1"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(CLIError, match=match):
        config.resolve(_args(str(f)))


def test_bad_flag_value():
    with pytest.raises(CLIError, match=r"--batch-size: expected an integer, got 'lots'"):
        config.resolve(_args("--batch-size", "lots"))


def test_print_config_round_trips(tmp_path, capsys):
    from fastflow.cli.main import main

    assert main(["fit", "--print-config", "--lr", "0.003", "--model-arg", "num_bins=5"]) == 0
    text = capsys.readouterr().out
    f = tmp_path / "printed.toml"
    f.write_text(text)
    again = config.resolve(_args(str(f))).config
    assert again["lr"] == 0.003 and again["model_args"]["num_bins"] == 5
    assert again == config.resolve(_args("--lr", "0.003", "--model-arg", "num_bins=5")).config
    assert set(tomllib.loads(text)) == set(config.BY_NAME)


def test_cli_exit_code_2_one_line(tmp_path, main_cli):
    f = tmp_path / "bad.toml"
    f.write_text("pateince = 3\n")
    code, err = main_cli("fit", f)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pateince" in lines[0] and "did you mean 'patience'" in lines[0]
    code, err = main_cli("fit", tmp_path / "missing.toml")
    assert code == 2 and "missing.toml" in err


def test_unknown_data_name(main_cli, tmp_path):
    code, err = main_cli("fit", "--data", "moon", "--out", tmp_path / "r", "--quiet")
    assert code == 2 and "'moon'" in err and "did you mean 'moons'" in err


def test_unreadable_data_file(main_cli, tmp_path):
    bad = tmp_path / "garbage.npy"
    bad.write_bytes(b"this is not an npy file")
    code, err = main_cli("fit", "--data", bad, "--out", tmp_path / "r", "--quiet")
    assert code == 2 and "garbage.npy" in err and len(err.strip().splitlines()) == 1
    code, err = main_cli("fit", "--data", tmp_path / "absent.csv", "--out", tmp_path / "r", "--quiet")
    assert code == 2 and "absent.csv" in err


def test_example_config_is_the_default():
    """examples/digits_nsf.toml documents the default `fastflow fit`: keep them in step."""
    from tests.cli.conftest import REPO

    example = config.resolve(_args(str(REPO / "examples" / "digits_nsf.toml"))).config
    assert example == config.resolve(_args()).config
