"""bf16jax.config: overrides parsed by ml_collections' config_flags, and `config_help`."""

import shlex
from pathlib import Path

import pytest

from bf16jax.config import config_help, config_path, load_config

REPO = Path(__file__).resolve().parents[1]


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["gpt_tiny", "t5_small", "vit_digits"])
def test_config_help_lists_every_key_as_an_override_that_round_trips(name):
    config = load_config(config_path(name), ["train.steps=7", "precision=bf16; q=w8a8"])
    lines = config_help(config).splitlines()
    leaves = dict(_leaves(config))
    assert len(lines) == len(leaves)
    # As a shell reads them (quotes removed): what a user pasting a line gets.
    flags = [shlex.split(line.rsplit("  (", 1)[0])[0] for line in lines]
    assert {f.split("=", 1)[0].removeprefix("--config.") for f in flags} == set(leaves)
    for line, (key, value) in zip(lines, sorted(leaves.items()), strict=True):
        assert line.startswith(f"--config.{key}=") and line.endswith(f"({type(value).__name__})")
    # Each line is a valid override: feeding all of them back gives the same config.
    again = load_config(config_path(name), flags)
    assert dict(_leaves(again)) == leaves
    assert "--config.precision='bf16; q=w8a8'" in config_help(config)


def test_overrides_accept_the_command_line_spelling_and_the_last_one_wins():
    config = load_config(
        config_path("gpt_tiny"),
        ["--config.train.steps=3", "train.steps=4", "mesh.rules=(('embed', 'fsdp'),)"],
    )
    assert config.train.steps == 4
    assert config.mesh.rules == (("embed", "fsdp"),)


def test_config_override_args_forwards_every_form_absl_accepts():
    # The studies pass the user's overrides on to each bf16jax.main run: every spelling absl
    # parses must come back as one token that parses to the same config.
    from absl import flags
    from ml_collections import config_flags

    from bf16jax.cli import config_override_args

    path = config_path("gpt_tiny")
    argv = ["study", f"--config={path}", "--config.train.steps", "7", "--seeds=0,1",
            "--noconfig.train.diagnostics", "-config.precision=bf16;q=w8a8",
            "--config.mesh.rules=(('batch', 'data'),)", "--", "--config.seed=3"]  # fmt: skip
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    flags.DEFINE_list("seeds", ["0"], "", flag_values=fv)
    fv(argv)
    forwarded = config_override_args(argv, fv)
    assert forwarded == [
        "--config.train.steps=7",
        "--noconfig.train.diagnostics",
        "--config.precision=bf16;q=w8a8",
        "--config.mesh.rules=(('batch', 'data'),)",
    ]
    child = load_config(path, [a for a in forwarded if not a.startswith("--no")])
    assert child.train.steps == fv.config.train.steps == 7
    assert child.precision == fv.config.precision and child.mesh.rules == (("batch", "data"),)
    assert fv.config.train.diagnostics is False and child.seed == 0


def test_split_config_overrides_for_scripts_of_several_configs():
    from bf16jax.cli import split_config_overrides

    args = ["--models=a,b", "--config.train.steps=7", "-config.precision", "bf16;q=w8a8",
            "--noconfig.train.diagnostics", "--config.checkpoint.async_save",
            "--quick"]  # fmt: skip
    rest, overrides = split_config_overrides(args)
    assert rest == ["--models=a,b", "--quick"]
    assert overrides == ["train.steps=7", "precision=bf16;q=w8a8", "train.diagnostics=false",
                         "checkpoint.async_save=true"]  # fmt: skip
    config = load_config(config_path("gpt_tiny"), overrides)
    assert config.train.steps == 7 and config.train.diagnostics is False
    assert config.checkpoint.async_save is True and config.precision == "bf16;q=w8a8"
