"""Decode steps bucketed by context length and several steps per call
(`inference.Programs.step_prefix`, `batching.ContinuousBatcher._step`): the same tokens as one
step over the whole cache, every bucket compiled by `warm`, and the programs export."""

import asyncio

import numpy as np
from flax import nnx

from bf16jax import config as config_lib
from bf16jax.models import build_model
from bf16jax.serving import inference
from bf16jax.serving.batching import ContinuousBatcher, GenRequest
from bf16jax.serving.runners import ProgramRunner

PROMPTS = ["And God said", "In the beginning God created the heaven and the earth.", "Ruth",
           "And the LORD spake unto Moses, saying, Speak unto"]  # fmt: skip
MAX_TOKENS = [30, 10, 57, 9]  # positions up to 63: every bucket, and the multi-step rule's edges


def _model():
    """A 1-layer fp32 GPT with a 64-token context, and its config."""
    c = config_lib.base_config("gpt")
    c.precision = "fp32"
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=64)
    c.data.update(seq_len=64)
    c.lock()
    return c, build_model(c.model, "fp32", rngs=nnx.Rngs(0))


def _runner():
    c, model = _model()
    return ProgramRunner(inference.Programs(model, c), {})


def _generate(runner, slots, **kw) -> tuple[list, list]:
    """(tokens and finish reason per request, program names called) of PROMPTS greedy and
    sampled, through a batcher with `kw`."""
    calls = []
    call = runner.call

    def record(name, *args):
        calls.append(name)
        return call(name, *args)

    runner.call = record

    async def run():
        batcher = ContinuousBatcher(runner, slots, **kw)
        batcher.start()
        loop, requests = asyncio.get_running_loop(), []
        for temperature in (0.0, 1.0):
            for p, n in zip(PROMPTS, MAX_TOKENS, strict=True):
                r = GenRequest(runner.encode(p), n, temperature=temperature, seed=7,
                               queue=asyncio.Queue(), loop=loop)  # fmt: skip
                requests.append(r)
                batcher.submit(r)
        out = []
        for r in requests:
            tokens = []
            while (event := await r.queue.get())[0] == "token":
                tokens.append(int(event[1]))
            out.append((tokens, event[1]))
        batcher.stop()
        return out

    try:
        return asyncio.run(run()), calls
    finally:
        runner.call = call


def test_context_buckets_and_multi_step_give_the_whole_cache_steps_tokens():
    runner = _runner()
    assert runner.limits["step_buckets"] == [32, 48] and runner.limits["multi_step"] == 4
    plain, plain_calls = _generate(runner, 3, context_buckets=False, multi_step=False)
    got, calls = _generate(runner, 3)
    assert got == plain  # token for token, greedy and sampled, and the same finish reasons
    assert [len(t) for t, _ in plain[:4]] == MAX_TOKENS  # each request ran to its max_tokens
    steps = {"step", "step_32", "step_48", "step_32x4", "step_48x4", "step_64x4"}
    assert {c for c in plain_calls if c.startswith("step")} == {"step"}
    warmed = calls[: calls.index("step_64x4") + 1]  # `warm` compiles every step program first
    assert steps <= set(warmed)
    used = set(calls[len(warmed) :])
    assert {"step_32x4", "step_48x4"} <= used and used & {"step_32", "step_48", "step"}


def test_step_programs_export_and_run_from_the_artifact(tmp_path):
    """The bucketed and multi-step programs are in the artifact (donating their cache) and
    give the same tokens there."""
    from bf16jax.serving import artifact, export

    c, model = _model()
    export.export_artifact(c, nnx.state(model, nnx.Param), None, str(tmp_path / "a"),
                           precision="fp32", source={"random_init": True}, platforms=("cpu",),
                           eval_batches=0)  # fmt: skip
    art = artifact.Artifact(str(tmp_path / "a"))
    assert {"step_32", "step_48", "step_32x4", "step_64x4"} <= set(art.programs)
    assert art.manifest["programs"]["step_48x4"]["signature"].startswith("K steps")
    got, _ = _generate(art, 2)
    expected = art.generate(PROMPTS, max_tokens=MAX_TOKENS)
    assert [t for t, _ in got[:4]] == [e["tokens"] for e in expected]
    assert np.all([r == e["finish_reason"] for (_, r), e in zip(got[:4], expected, strict=True)])
