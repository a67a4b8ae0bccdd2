"""Command-line entry point: `python -m bf16jax.main --config=configs/NAME.py --workdir=DIR`.

Any config key can be overridden (`--config.precision=bf16-pure --config.train.steps=100`); the
config is locked, so a misspelt key fails with its name instead of being ignored. Multi-host
(TPU pods): every host runs the same command; `jax.distributed` is initialized first (see
`config.mesh.distributed`). Rerunning with the same workdir resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    # Before anything touches a device: on a pod every host must join first.
    from bf16jax import sharding

    sharding.maybe_initialize_distributed(config.mesh.distributed)
    import jax

    from bf16jax import loop

    # Orbax logs every save at INFO through absl; keep the terminal to bf16jax's own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bf16jax").setLevel(logging.INFO)
    result = loop.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() != 0:
        return
    summary = {
        k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "sample"
    }
    print(json.dumps({"final": summary}, sort_keys=True))
    if "sample" in result:
        print("\n--- sample ---\n" + result["sample"] + "\n--------------")


def run() -> None:
    """`main` under absl with bf16jax's bad-input handling (`bf16jax.cli.run`)."""
    from bf16jax import cli

    cli.run(main)


if __name__ == "__main__":
    run()
