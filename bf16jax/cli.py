"""Shared parts of bf16jax's command-line tools (export, generate, evaluate, gate, registry,
serve): the flags that name a training run or an artifact, quiet logging, and the runner that
turns bad input into one line on stderr and exit code 2 (`run`, also behind `bf16jax.main`).

Flags are defined by each tool's `__main__` block, never at import, so the library modules can
be imported together without absl flag clashes.
"""

from __future__ import annotations

import logging
import re
import sys

__all__ = [
    "define_source_flags",
    "define_eval_flags",
    "write_report",
    "run_from_flags",
    "quiet_logs",
    "run",
]


def define_source_flags(*, artifact: bool = True) -> None:
    """--config / --workdir / --step name a training run; --artifact an exported directory."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "The run's configs/*.py (with its --config.x overrides).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The training run's --workdir (its checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    if artifact:
        flags.DEFINE_string("artifact", None, "An artifact directory (bf16jax.export).")


def define_eval_flags() -> None:
    """--num_batches / --seed of the held-out evaluation and --out for the JSON report."""
    from absl import flags

    flags.DEFINE_integer("num_batches", None, "Eval batches (default config.train.eval_steps).")
    flags.DEFINE_integer("seed", 0, "Seed of the shifted inputs.")
    flags.DEFINE_string("out", None, "Also write the JSON report to this file.")


def write_report(text: str) -> None:
    """Prints `text` and writes it to --out when given."""
    from absl import flags

    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text)


def run_from_flags():
    """(config, workdir) from --config / --workdir; ValueError naming what is missing."""
    from absl import flags

    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        has_artifact = "artifact" in f
        what = "--artifact=DIR, or " if has_artifact else ""
        raise ValueError(
            f"Name a model: {what}--config=configs/NAME.py (the run's config and overrides) "
            "with its --workdir."
        )
    return f.config, f.workdir


def quiet_logs() -> None:
    """Orbax / absl at WARNING, bf16jax's own lines at INFO."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bf16jax").setLevel(logging.INFO)


def _unknown_key(argv: list[str], error: Exception) -> str:
    """The message for an `--config.X=...` override naming a key the config does not have."""
    overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--config.")]
    guess = re.search(r'Did you mean "([^"]+)"', str(error))
    hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
    return (
        f"unknown config key among {', '.join(overrides)}{hint}: the config is locked. "
        "Run with --helpfull to list every config.* flag."
    )


def run(main_fn) -> None:
    """Runs `main_fn(argv)` under absl; bad input (config, flags, values) exits 2, one line."""
    from absl import app

    try:
        app.run(main_fn)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these while parsing an override of a key that does not exist.
        if not any(a.startswith("--config.") for a in sys.argv):
            raise
        print(f"error: {_unknown_key(sys.argv, e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # ml_collections defers a --config file that failed to load (missing, unreadable) to
        # the first use of the config; its message names the path.
        if "Failed loading config file" not in str(e):
            raise
        print(f"error: --config: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # config / data / checkpoint errors: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
