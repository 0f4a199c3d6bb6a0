"""Flags generated from the config dataclasses (ecserve/cli/flags.py): every flag of every
subcommand comes from one documented field, its default is the field's, and the offline and
served commands share their generation flags."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from ecserve.cli import COMMANDS, build_parser, main
from ecserve.cli.generation import unescape
from ecserve.config import EngineConfig, LaunchConfig, ModelConfig, RoutingConfig, ServerConfig
from ecserve.config.fields import field_docs
from ecserve.request import Request, SamplingParams

# Arguments written by hand, each once: positionals, and bench's targets (generated from their
# one table, ecserve.loadtest.targets.TARGETS).
HAND_WRITTEN = {"help", "version", "prompts", "prompt"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_config_field_is_documented():
    from ecserve.loadtest.config import LoadTestConfig
    from ecserve.placement.options import PlanOptions
    from ecserve.security import ClientOptions
    from ecserve.train.options import TrainOptions

    for cls in (ModelConfig, RoutingConfig, EngineConfig, ServerConfig, LaunchConfig,
                SamplingParams, LoadTestConfig, PlanOptions, ClientOptions, TrainOptions):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, (cls.__name__, missing)
    docs = field_docs(Request)
    assert "routing_scope" in docs and "request_id" not in docs  # documented where declared


def test_every_flag_comes_from_a_field_with_help_and_its_default():
    from ecserve.loadtest.targets import FLAG_TARGETS

    hand = HAND_WRITTEN | set(FLAG_TARGETS)
    for name, p in subparsers(build_parser()).items():
        for action in p._actions:
            if action.dest in hand:
                continue
            assert hasattr(action, "default_text"), f"{name} {action.option_strings}: by hand"
            assert action.help and len(action.help) > 10, (name, action.option_strings)
            if action.default_text:
                assert f"(default: {action.default_text})" in action.help


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig, LaunchConfig])
def test_unset_flags_keep_the_dataclass_defaults(cls):
    from ecserve.cli.flags import from_flags

    args = build_parser().parse_args(["serve"])
    assert from_flags(cls, args) == cls()


def test_offline_and_served_commands_share_generation_defaults():
    from ecserve.cli.generation import CLI_MAX_NEW_TOKENS, sampling_params

    parser = build_parser()
    offline = parser.parse_args(["generate", "x"])
    served = parser.parse_args(["client", "x"])
    assert sampling_params(offline) == sampling_params(served)
    assert sampling_params(served).max_new_tokens == CLI_MAX_NEW_TOKENS
    gen, cli = (subparsers(parser)[c] for c in ("generate", "client"))
    flags = {a.dest: a.help for a in gen._actions if a.container.title == "generation"}
    assert flags == {a.dest: a.help for a in cli._actions if a.container.title == "generation"}
    assert set(flags) >= {"max_new_tokens", "temperature", "top_p", "seed", "stop_sequences",
                          "routing_scope"}


def test_stop_flags_unescape_newlines_and_tabs():
    args = build_parser().parse_args(["client", "x", "--stop", r"\n\n", "--stop", r"a\tb\\n"])
    assert args.stop_sequences == ["\n\n", "a\tb\\n"]
    assert unescape(r"C:\path\x") == r"C:\path\x"  # other backslashes stay
    assert unescape("\\") == "\\"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "ecserve 0.1.0"


@pytest.mark.parametrize("command", ["generate", "client"])
def test_bad_generation_flags_name_the_field_before_any_work(command, capsys):
    """`client --seed -1` said protobuf's `Value out of range: -1`; now both commands check
    the flags by the engine's rules, before loading a model or calling a server."""
    extra = ["--address", "127.0.0.1:1"] if command == "client" else ["--model", "/nowhere"]
    assert main([command, "x", "--seed", "-1", *extra]) == 2
    assert capsys.readouterr().err == "ecserve: error: seed must be in [0, 2**63), got -1\n"
    assert main([command, "", *extra]) == 2  # `generate ""` generated; `client ""` refused
    assert capsys.readouterr().err.startswith("ecserve: error: prompt: empty")


def test_a_file_given_as_the_model_is_named(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("not a model")
    assert main(["generate", "x", "--model", str(readme)]) == 2
    assert capsys.readouterr().err == (f"ecserve: error: {readme}: not a directory (a model "
                                       "directory holds config.json and the weights)\n")


def test_init_model_into_an_existing_directory_says_so(tmp_path: Path, capsys):
    for flags in ([], ["--random"]):
        assert main(["init-model", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ecserve: error: {tmp_path} already exists: init-model writes "
                              "a new directory"), err
        assert "Errno" not in err


def test_every_command_is_documented():
    for name, module in COMMANDS.items():
        assert module.HELP and module.__doc__, name
