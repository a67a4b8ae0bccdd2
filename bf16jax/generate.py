"""Command: `python -m bf16jax.generate` (library: `bf16jax.serving.runners`).

See `bf16jax.serving.runners` for what it computes; this module holds its flags and `main`.
"""

from __future__ import annotations

import json

from bf16jax.serving.artifact import Artifact, Runner
from bf16jax.serving.runners import runner_from_workdir


def load_runner(flags_values) -> Runner:
    """The runner the command line names (--artifact, or --config with --workdir)."""
    from bf16jax import cli

    if flags_values.artifact:
        return Artifact(flags_values.artifact)
    config, workdir = cli.run_from_flags()
    return runner_from_workdir(config, workdir, flags_values.precision, flags_values.step)


def _main(argv) -> None:
    from absl import flags

    from bf16jax import cli

    if len(argv) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    cli.quiet_logs()
    if not f.prompt:
        raise ValueError("Pass at least one --prompt=TEXT.")
    runner = load_runner(f)
    rows = runner.generate(
        f.prompt, max_tokens=f.max_tokens, temperature=f.temperature, top_k=f.top_k,
        top_p=f.top_p, stop=[list(f.stop or [])] * len(f.prompt), seed=f.seed,
    )  # fmt: skip
    for prompt, row in zip(f.prompt, rows, strict=True):
        print(json.dumps({"prompt": prompt, **row}))


def _define_flags() -> None:
    from absl import flags

    from bf16jax import cli

    cli.define_source_flags()
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
    flags.DEFINE_string("precision", "train", "A run's serving precision: train, fp32, bf16, "
                        "int8 or fp8.")  # fmt: skip
    flags.DEFINE_integer(
        "max_tokens", None, "New tokens per prompt at most (default: min(64, the context)); "
        "as the server's default.",
    )  # fmt: skip
    flags.DEFINE_float("temperature", 0.0, "0: greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_multi_string(
        "stop", [], "A stop string, matched on the decoded text (repeatable)."
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed (per prompt).")


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
