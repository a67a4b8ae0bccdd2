"""Text generation with a KV cache from an artifact or a training run.

`python -m bf16jax.generate --artifact=DIR --prompt="And God said"` (or `--workdir=RUN`, its
config.json read; or with the run's `--config=...`) prints one JSON line per prompt: the text,
its token ids and why it stopped (length, eos, stop, context). Greedy by default
(`--temperature=0`); `--temperature`, `--top_k`, `--top_p`, `--max_tokens` (default min(64,
the context)), `--stop` (repeatable) and `--seed` as in `bf16jax.serving.sampling`. A run
with a pretrained tokenizer (`data.tokenizer`) encodes and decodes text with it.
Invariant: a run and its artifact generate through the same program
(`inference.Programs.generate`, jit-compiled here, `jax.export`-ed there) and the same request
code (`artifact.Runner`), so their outputs agree.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax

from bf16jax.data.tokenizer import load_tokenizer
from bf16jax.serving import inference
from bf16jax.serving.artifact import Runner, donated_args

__all__ = ["ProgramRunner", "runner_from_workdir"]


class ProgramRunner(Runner):
    """A `Runner` on a training run's params: the serving programs, jit-compiled in process."""

    def __init__(
        self, programs: inference.Programs, description: dict[str, Any], text_tokenizer=None
    ):
        """`text_tokenizer`: the run's pretrained tokenizer (`load_tokenizer`), which encodes
        and decodes text requests; None for bytes (the `Runner`'s own)."""
        self.family = programs.family
        self.limits = programs.limits
        self.tokenizer = programs.tokenizer
        path = (programs.tokenizer or {}).get("path")
        self.tokenizer_dir = os.path.dirname(path) if path else ""
        self.description = description
        self._programs = programs
        self._text = text_tokenizer

    def encode(self, text: str):
        if self._text is None:
            return super().encode(text)
        return self._text.encode(text)

    def decode(self, ids) -> str:
        if self._text is None:
            return super().decode(ids)
        return self._text.decode(list(ids))

    @functools.cache  # noqa: B019 (one runner per model: the jitted programs live with it)
    def _jitted(self, name: str):
        donate = donated_args(name)  # the slot cache: updated in place
        return jax.jit(self._programs.function(name), donate_argnums=donate)

    def call(self, name: str, *args):
        return self._jitted(name)(self._programs.params, *args)


def runner_from_workdir(config, workdir: str, precision: str = "train", step: int | None = None):
    """A runner on a run's checkpoint at a serving precision ("train": its own policy)."""
    params, meta, step = inference.restore_params(config, workdir, step)
    model = inference.serving_model(config, params, meta, precision)
    desc = {"workdir": os.path.abspath(workdir), "step": step, "precision": precision}
    spec = config.data.get("tokenizer", "") or ""
    text = load_tokenizer(spec) if spec else None  # a run's own tokenizer, as it trained
    return ProgramRunner(inference.Programs(model, config), desc, text)
