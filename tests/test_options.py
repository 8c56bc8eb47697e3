"""The command line is generated from the configuration dataclasses: flags, defaults and parsing follow the fields."""

import argparse
import dataclasses

import pytest

from refusal_lens import cli
from refusal_lens.config import RunConfig
from refusal_lens.options import add_options, from_args, option
from refusal_lens.over_refusal import OverRefusalConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _listed(parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of the options ``--help`` shows."""
    return {a.dest for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"}


@pytest.mark.parametrize(("command", "config"), [("run", RunConfig), ("over-refusal", OverRefusalConfig)])
def test_help_lists_exactly_the_config_fields_and_the_model_options(command, config):
    fields = {f.name for f in dataclasses.fields(config)} | {f.name for f in dataclasses.fields(cli.ModelOptions)}
    assert _listed(_subparser(command)) == fields
    help_text = _subparser(command).format_help()
    for field in dataclasses.fields(config):
        assert f"--{field.name.replace('_', '-')}" in help_text


@pytest.mark.parametrize(("command", "config"), [("run", RunConfig), ("over-refusal", OverRefusalConfig)])
def test_defaults_are_the_config_defaults(command, config):
    args = cli.build_parser().parse_args([command])
    assert from_args(config, args) == config()
    assert from_args(cli.ModelOptions, args) == cli.ModelOptions()


def test_every_kind_of_field_parses_into_the_config():
    args = cli.build_parser().parse_args([
        "run", "--alphas", "0,0.5,1", "--pick=-1,3", "--kl-max", "null:0.5", "--full-selection-table",
        "--capability-tasks", "", "--n-train", "8", "--fallback", "lowest-kl", "--no-static-figures", "--seed", "3"])
    config = from_args(RunConfig, args)
    assert config == RunConfig(alphas=(0.0, 0.5, 1.0), pick=(-1, 3), kl_max="null:0.5", full_selection_table=True,
                               capability_tasks=(), n_train=8, fallback="lowest-kl", static_figures=False, seed=3)
    assert from_args(RunConfig, cli.build_parser().parse_args(["run", "--kl-max", "0.25"])).kl_max == 0.25


def test_short_historical_flags_still_set_their_fields():
    args = cli.build_parser().parse_args(["run", "--no-filter", "--html-only", "--full-selection-table",
                                          "--lazy-selection", "--direction", "d.pt", "--layer", "4"])
    config = from_args(RunConfig, args)
    assert (config.filter_by_refusal, config.static_figures, config.full_selection_table) == (False, False, False)
    assert (config.direction, config.direction_layer) == ("d.pt", 4)


def test_bad_values_fail_before_any_model_loads():
    with pytest.raises(ValueError, match="unknown fallback 'sometimes'"):
        cli.main(["run", "--model", "no/such-model", "--fallback", "sometimes"])
    with pytest.raises(ValueError, match="needs the layer"):
        cli.main(["run", "--model", "no/such-model", "--direction", "d.pt"])
    with pytest.raises(ValueError, match="null:q"):
        RunConfig(kl_max="median")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--pick", "3"])


def test_a_field_without_option_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Config:
        documented: int = option(1, "a documented field")
        undocumented: int = 2

    with pytest.raises(TypeError, match="undocumented is not declared with option"):
        add_options(argparse.ArgumentParser(), Config)
