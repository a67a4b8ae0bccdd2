"""Text generation with a KV cache from an artifact or a training run.

`python -m bf16jax.generate --artifact=DIR --prompt="And God said"` (or `--config=...
--workdir=...`) prints one JSON line per prompt: the text, its token ids and why it stopped
(length, eos, stop, context). Greedy by default (`--temperature=0`); `--temperature`,
`--top_k`, `--top_p`, `--max_tokens`, `--stop` (repeatable) and `--seed` as in
`bf16jax.sampling`. Invariant: a run and its artifact generate through the same program
(`inference.Programs.generate`, jit-compiled here, `jax.export`-ed there) and the same request
code (`artifact.Runner`), so their outputs agree.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax

from bf16jax import inference
from bf16jax.artifact import Artifact, Runner

__all__ = ["ProgramRunner", "runner_from_workdir", "load_runner"]


class ProgramRunner(Runner):
    """A `Runner` on a training run's params: the serving programs, jit-compiled in process."""

    def __init__(self, programs: inference.Programs, description: dict[str, Any]):
        self.family = programs.family
        self.limits = programs.limits
        self.tokenizer = programs.tokenizer
        self.description = description
        self._programs = programs

    @functools.cache  # noqa: B019 (one runner per model: the jitted programs live with it)
    def _jitted(self, name: str):
        return jax.jit(self._programs.function(name))

    def call(self, name: str, *args):
        return self._jitted(name)(self._programs.params, *args)


def runner_from_workdir(config, workdir: str, precision: str = "train", step: int | None = None):
    """A runner on a run's checkpoint at a serving precision ("train": its own policy)."""
    params, meta, step = inference.restore_params(config, workdir, step)
    model = inference.serving_model(config, params, meta, precision)
    desc = {"workdir": os.path.abspath(workdir), "step": step, "precision": precision}
    return ProgramRunner(inference.Programs(model, config), desc)


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
    flags.DEFINE_integer("max_tokens", 64, "New tokens per prompt at most.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
    flags.DEFINE_multi_string("stop", [], "A stop sequence (repeatable, at most 4).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (per prompt).")


if __name__ == "__main__":
    from bf16jax import cli

    _define_flags()
    cli.run(_main)
