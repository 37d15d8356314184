"""The command line's own rules: train and export refuse options that do not act in the chosen kind
of run, every option a federated run accepts reaches its settings, and predict/explain take one case
or a dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fedlite.cli import export_build, main, train
from fedlite.cli_modes import ModeOption
from fedlite.cli_options import federated_config

MODE_ARGS = {"train": {"centralized": ["--centralized"], "federated": [], "edge": ["--edge", "bundle"],
                       "resume": ["--resume", "run"]},
             "export": {"pooled": ["ckpt"], "federated": ["ckpt", "--sites", "split"]}}
COMMANDS = {"train": train, "export": export_build}


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def _value_for(param: ModeOption) -> list[str]:
    """A command-line value for the option, other than its default."""
    if param.is_flag:
        return [param.opts[0]]
    if hasattr(param.type, "choices"):
        return [param.opts[0], next(c for c in param.type.choices if c != param.default)]
    if param.default is None or isinstance(param.default, str):
        return [param.opts[0], "20" if param.name == "link_mbps" else "somewhere"]
    return [param.opts[0], str(param.default + 1) if isinstance(param.default, int) else "0.3"]


@pytest.mark.parametrize("command,mode", [(c, m) for c, modes in MODE_ARGS.items() for m in modes])
def test_options_that_do_not_act_in_the_kind_of_run_are_refused(command, mode):
    flags = {flag for flag, *_ in COMMANDS[command].modes.values()}
    foreign = [p for p in COMMANDS[command].params
               if isinstance(p, ModeOption) and p.modes and mode not in p.modes and p.name not in flags]
    assert foreign, f"every option of {command} acts in {mode} runs?"
    for param in foreign:
        result = _invoke([command, *MODE_ARGS[command][mode], *_value_for(param)])
        assert result.exit_code == 2, (param.name, result.output)
        assert f"{param.opts[0]} does not apply to" in result.output and "drop it" in result.output


def test_every_option_has_a_help_section_and_the_help_names_the_modes():
    for command in COMMANDS.values():
        assert all(isinstance(p, ModeOption) for p in command.params if p.name != "help" and p.opts[0][0] == "-")
    text = _invoke(["train", "--help"]).output
    for heading in ("Kind of run:", "Model (centralized, federated):", "Pooled training (centralized):",
                    "Rounds (federated, edge):", "Full-model rounds (federated):", "Edge fine-tuning (edge):"):
        assert heading in text


def test_two_kinds_of_run_at_once_are_refused():
    result = _invoke(["train", "--centralized", "--resume", "run"])
    assert result.exit_code == 2 and "--centralized and --resume pick different kinds of run" in result.output


def _parsed(args: list[str]) -> dict:
    return train.make_context("train", ["--data", "split", *args]).params


def test_every_federated_option_reaches_the_run_settings():
    """No option of a federated run is parsed and then dropped: each one changes its FederatedConfig."""
    base = federated_config(_parsed([]))
    ignored = [param.name for param in train.params
               if isinstance(param, ModeOption) and "federated" in param.modes and param.name != "data_dir"
               and federated_config(_parsed([*_value_for(param),
                                             *(["--strategy", "fedprox"] if param.name == "proximal_mu" else [])]))
               == base]
    assert ignored == []


def test_predict_and_explain_take_one_case_or_a_dataset(tmp_path):
    for command in ("predict", "explain"):
        neither = _invoke([command, str(tmp_path)])
        assert neither.exit_code == 2 and "give one case" in neither.output
        both = _invoke([command, str(tmp_path), "--image", "x.png", "--text", "note", "--data", str(tmp_path)])
        assert both.exit_code == 2 and "give one case" in both.output
        no_note = _invoke([command, str(tmp_path), "--image", "x.png"])
        assert no_note.exit_code == 2 and "exactly one of --text, --text-file" in no_note.output
        empty = _invoke([command, str(tmp_path), "--image", "x.png", "--text", "  "])
        assert empty.exit_code == 2 and "the clinical note is empty" in empty.output
    chosen = _invoke(["explain", str(tmp_path), "--image", "x.png", "--text", "note", "--limit", "3"])
    assert chosen.exit_code == 2 and "--case and --limit choose cases of a dataset" in chosen.output
    named = _invoke(["explain", str(tmp_path), "--data", str(tmp_path), "--case-id", "a"])
    assert named.exit_code == 2 and "--case-id names the report of one case" in named.output
