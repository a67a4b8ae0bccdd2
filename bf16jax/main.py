"""Command-line entry point: `python -m bf16jax.main --config=configs/NAME.py --workdir=DIR`.

Any config key can be overridden (`--config.precision=bf16-pure --config.train.steps=100`); the
config is locked, so a misspelt key fails with its name instead of being ignored.
`--config_help` lists every key of the given config with its type and value and exits;
`--helpfull` with a `--config` ends with the same list. The resolved config is logged when a run
starts. Multi-host (TPU pods): every host runs the same command; `jax.distributed` is
initialized first (see `config.mesh.distributed`). Rerunning with the same workdir resumes from
its newest checkpoint.

Exit codes: 0 trained (or already done); 2 bad input, refused with one line `error: ...` that
names the problem and the fix, before anything already written is changed; 3 training diverged
(`train.max_skips_in_a_row` skipped steps in a row; the last good checkpoint is kept); 75
preempted (SIGTERM / SIGINT: the current step was saved; rerun the same command to resume);
130 a second SIGINT (stopped without saving the current step).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bf16jax import cli
from bf16jax.cli import BAD_INPUT_EXIT, DIVERGED_EXIT, INTERRUPTED_EXIT, BadInput
from bf16jax.training.preemption import PREEMPTED_EXIT

__all__ = ["run", "main", "BAD_INPUT_EXIT", "DIVERGED_EXIT", "PREEMPTED_EXIT", "INTERRUPTED_EXIT"]

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a configs/*.py file (get_config()); override any key with --config.KEY=VALUE "
    "(--config_help lists them).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
cli.define_config_help_flag()
flags.mark_flags_as_required(["config"])
flags.register_validator(
    "workdir",
    lambda workdir: workdir is not None or flags.FLAGS["config_help"].value,
    message="Flag --workdir must have a value other than None (or pass --config_help).",
)


def main(argv) -> None:
    if len(argv) > 1:
        raise BadInput(
            f"unexpected arguments {' '.join(argv[1:])}: pass flags only "
            "(--config=... --workdir=... --config.KEY=VALUE)."
        )
    config = _CONFIG.value
    if not hasattr(config, "lock"):
        raise BadInput(
            f"--config={flags.FLAGS['config'].config_filename}: get_config() returned a "
            f"{type(config).__name__}, not an ml_collections.ConfigDict."
        )
    # Before anything touches a device: on a pod every host must join first.
    from bf16jax.parallel import sharding

    sharding.maybe_initialize_distributed(config.mesh.distributed)
    import jax

    from bf16jax.training import loop

    # Orbax logs every save at INFO through absl, and the tracebacks of its background threads
    # at ERROR; its errors reach bf16jax as exceptions (one line each, see `run`). Keep the
    # terminal to bf16jax's own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # Orbax's unretrieved futures
    logging.getLogger("bf16jax").setLevel(logging.INFO)
    result = loop.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        summary = {
            k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "sample"
        }
        print(json.dumps({"final": summary}, sort_keys=True))
        if "sample" in result:
            print("\n--- sample ---\n" + result["sample"] + "\n--------------")
    if result.get("preempted"):
        sys.exit(PREEMPTED_EXIT)


def run(argv: list[str] | None = None) -> None:
    """Runs the CLI (`argv` as sys.argv, program name first); exits with the module's codes.

    Errors the user can fix print one line `error: ...` on stderr (no traceback); anything else
    is a bug and keeps its traceback (`bf16jax.cli.run`, shared by every bf16jax CLI).
    """
    cli.run(main, argv, require_config=True)


if __name__ == "__main__":
    run()
