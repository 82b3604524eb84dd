"""The configuration schema: one declaration per option, from which the command line, sweep
grids, the JSON form, compat.learn's names and the README's table are derived."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fastnn import Config, ConfigError
from fastnn.cli import add_config_flags, config_from_args, main
from fastnn.compat import learn, learn_names, regularization_keys
from fastnn.config import OPTIONS, default_of, flag_names, markdown_table, sweepable
from fastnn.sweep import parse_grid

ROOT = Path(__file__).resolve().parent.parent

#: option -> (a value other than the default, other options that value needs)
SAMPLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "hidden": ((64, 32, 16), {}),
    "activation": ("tanh", {}),
    "activation_params": ({"alpha": 0.2}, {"activation": "leaky_relu"}),
    "init": ("glorot_uniform", {}),
    "init_params": ({"mean": 0.5, "std": 0.05}, {"init": "normal_w"}),
    "bias_init": ("ones_b", {}),
    "bias_init_params": ({"min": -0.1, "max": 0.2}, {"bias_init": "uniform_b"}),
    "output": ("identity_mse", {}),
    "normalize": ("z_score", {}),
    "normalize_axis": (0, {}),
    "eta": (0.025, {}),
    "optimizer": ("adam", {}),
    "momentum": (0.5, {"optimizer": "momentum"}),
    "beta1": (0.8, {"optimizer": "adam"}),
    "beta2": (0.99, {"optimizer": "adamw"}),
    "eps": (1e-6, {"optimizer": "adam"}),
    "lr_schedule": ("cosine", {}),
    "warmup": (2, {}),
    "lr_step_size": (3, {"lr_schedule": "step"}),
    "lr_gamma": (0.5, {"lr_schedule": "exponential"}),
    "lr_min": (0.001, {"lr_schedule": "cosine"}),
    "lr_patience": (2, {"lr_schedule": "plateau"}),
    "plateau_loss": ("validation", {"lr_schedule": "plateau", "early_stopping": 3}),
    "batch_size": (32, {}),
    "epochs": (7, {}),
    "shuffle": (False, {}),
    "weight_decay": (("l2", 0.0001), {}),
    "dropout_input": (0.8, {}),
    "dropout_hidden": (0.5, {}),
    "dropout_mode": ("inverted", {}),
    "batch_norm": ("node", {}),
    "batch_norm_eta": (0.3, {"batch_norm": "bn"}),
    "bn_eval": ("running", {"batch_norm": "bn"}),
    "bn_momentum": (0.75, {}),
    "dtype": ("float32", {}),
    "backend": ("numba", {}),
    "seed": (11, {}),
    "n_inputs": (100, {}),
    "n_outputs": (3, {}),
    "early_stopping": (4, {}),
    "validation_fraction": (0.25, {"early_stopping": 2}),
    "tol": (0.0001, {}),
    "n_iter_no_change": (10, {}),
    "train_figures": ("running", {}),
    "stop_on_divergence": (True, {}),
}
FROM_DATA = {"n_inputs", "n_outputs"}


def _config_actions() -> dict[str, list[argparse.Action]]:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, []).append(action)
    return actions


def test_every_option_has_a_sample_other_than_its_default() -> None:
    assert list(SAMPLES) == list(OPTIONS) == [f.name for f in Config.__dataclass_fields__.values()]
    for name, (value, _) in SAMPLES.items():
        assert value != default_of(name), name


def test_every_option_has_exactly_one_flag() -> None:
    actions = _config_actions()
    flags = [option.flag for option in OPTIONS.values() if option.flag]
    assert len(flags) == len(set(flags)), "two options share a flag"
    assert {name for name, option in OPTIONS.items() if option.flag is None} == FROM_DATA
    for name, option in OPTIONS.items():
        if option.flag is None:
            assert name not in actions, name
            continue
        assert len(actions[name]) == 1, f"{name} has {len(actions[name])} flags"
        assert actions[name][0].option_strings == [option.flag], name


def test_train_help_lists_every_flag_with_its_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS.values():
        if option.flag:
            assert option.flag in text
            assert " ".join(option.help.split()) in text, option.flag


@pytest.mark.parametrize("name", [name for name in OPTIONS if name not in FROM_DATA])
def test_each_flag_reads_its_sample(name: str) -> None:
    value, needs = SAMPLES[name]
    option = OPTIONS[name]
    argv = []
    for other, other_value in needs.items():
        argv += [OPTIONS[other].flag, OPTIONS[other].rule.format(other_value)]
    if option.switch:
        argv.append(option.flag)
    elif option.repeat:  # one NAME=X per flag
        for key, number in value.items():
            argv += [option.flag, f"{key}={number}"]
    else:
        argv += [option.flag, option.rule.format(value)]
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    config = config_from_args(parser.parse_args(argv))
    assert getattr(config, name) == value


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_sample_round_trips_through_json_and_the_grid(name: str) -> None:
    value, needs = SAMPLES[name]
    config = Config(**needs, **{name: value})
    assert getattr(config, name) == value
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and getattr(again, name) == value
    if name in FROM_DATA:
        assert name not in sweepable()
        with pytest.raises(ConfigError, match="cannot sweep"):
            parse_grid([f"{name}={value}"], Config(**needs))
        return
    text = OPTIONS[name].rule.format(value)
    assert "," not in text
    [point] = parse_grid([f"{name}={text}"], Config(**needs))
    assert getattr(point.config, name) == value and point.values == {name: text}


def test_every_sweepable_option_sweeps_two_values() -> None:
    for name in sweepable():
        value, needs = SAMPLES[name]
        base = Config(**needs)
        rule = OPTIONS[name].rule
        texts = [rule.format(getattr(base, name)), rule.format(value)]
        points = parse_grid([f"{name}={','.join(texts)}"], base)
        assert [getattr(p.config, name) for p in points] == [getattr(base, name), value]
        assert len({p.name for p in points}) == 2


def test_grid_keys_may_be_flags() -> None:
    [point] = parse_grid(["alpha=0.3"], Config(activation="leaky_relu"))
    assert point.config.activation_params == {"alpha": 0.3}
    [point] = parse_grid(["batch-size=20"], Config())
    assert point.config.batch_size == 20
    with pytest.raises(ConfigError, match="cannot sweep 'no_shuffle'"):
        parse_grid(["no_shuffle=true"], Config())


def test_messages_name_options_in_python_and_flags_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer >= 1"):
        Config(batch_size=0)
    with flag_names(), pytest.raises(ConfigError, match=r"^--batch-size must be an integer >= 1"):
        Config(batch_size=0)
    with pytest.raises(ConfigError, match=r"^activation_params key 'alpha' needs activation"):
        Config(activation_params={"alpha": 0.1})
    with flag_names(), pytest.raises(ConfigError, match=r"^--alpha needs --activation leaky_re"):
        Config(activation_params={"alpha": 0.1})


def test_validation_fraction_without_early_stopping() -> None:
    assert Config(validation_fraction=0.1).validation_fraction == 0.1  # the default is fine
    with pytest.raises(ConfigError, match="early_stopping"):
        Config(validation_fraction=0.3)
    saved = Config().to_dict()
    assert Config.from_dict(saved) == Config()
    # saved before this was an error: the value had no effect, so it reads as the default
    assert Config.from_dict({**saved, "validation_fraction": 0.3}) == Config()
    kept = Config.from_dict({**saved, "validation_fraction": 0.3, "early_stopping": 2})
    assert kept.validation_fraction == 0.3


def test_learn_names_come_from_the_schema_and_cover_learn() -> None:
    parameters = set(inspect.signature(learn).parameters)
    named = {option.learn for option in OPTIONS.values() if option.learn}
    tops = {re.split(r"[./]", learn_name)[0] for learn_name in named}
    tops |= {part for name in named if "." not in name for part in name.split("/")}
    assert tops <= parameters
    not_options = {"name", "x_train", "t_train", "x_test", "t_test", "output_params", "verbose"}
    assert parameters - not_options == tops
    assert learn_names()["epoch"] == "epochs" and learn_names()["md"] == "hidden"
    assert set(regularization_keys()) == {
        "weight_decay_func",
        "weight_decay_lambda",
        "dropout_input_ratio",
        "dropout_middle_ratio",
        "batch_norm",
        "batch_norm_node",
        "batch_norm_eta",
    }


def test_readme_table_is_the_schema() -> None:
    text = (ROOT / "README.md").read_text()
    begin, end = "<!-- fastnn:config-table:begin -->", "<!-- fastnn:config-table:end -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), "run: python tools/readme_config_table.py"
    for name, option in OPTIONS.items():
        assert f"| `{name}` |" in table and option.help.replace("|", "\\|") in table
