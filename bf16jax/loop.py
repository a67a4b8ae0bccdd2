"""The training loop around `bf16jax.train.Trainer`: data, checkpoints, metrics, eval, samples.

`train_and_evaluate(config, workdir)` is what `python -m bf16jax.main` runs: it resumes from the
newest checkpoint in `workdir/checkpoints` (state and grain iterator position), logs train
metrics every `train.log_every` steps (JSONL, TensorBoard, a progress bar on a terminal),
evaluates every `train.eval_every` steps, runs the FP32 drift check, checkpoints, and samples
text from GPT models at the end. Only process 0 writes metrics. On a preemption notice (Orbax's
sync point: SIGTERM under jax.distributed) it saves the current step, waits for the save to
commit and returns early with `preempted=True`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from bf16jax import convert
from bf16jax import data as data_lib
from bf16jax import metrics as metrics_lib
from bf16jax.checkpoint import Checkpointer
from bf16jax.train import Trainer, TrainState, create_trainer

log = logging.getLogger(__name__)

__all__ = ["train_and_evaluate", "tokens_per_step", "flops_per_token", "sample_text"]


def tokens_per_step(config) -> int:
    """Tokens per global batch (GPT: B*T, T5: B*(enc+dec)); examples for image models."""
    d, name = config.data, config.model.name
    if name == "gpt":
        return int(d.batch_size * d.seq_len)
    if name == "t5":
        return int(d.batch_size * (d.enc_len + d.dec_len))
    return int(d.batch_size)  # images: examples


def flops_per_token(config, n_params: int) -> float | None:
    """Training FLOPs per token for GPT models (see bf16jax.metrics); None for the others."""
    m = config.model
    if m.name != "gpt":
        return None  # encoder-decoder / image FLOPs are not one per-token figure: no MFU
    pos = m.max_len * m.embed_dim  # position embeddings do no matmul FLOPs
    return metrics_lib.flops_per_token(
        n_params - pos, num_layers=m.num_layers, seq_len=config.data.seq_len, attn_dim=m.embed_dim
    )


def _progress(total: int, initial: int):
    if jax.process_index() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest checkpoint) and evaluates.

    Writes `workdir/metrics.jsonl`, TensorBoard events in `workdir/tb` and checkpoints in
    `workdir/checkpoints`. Returns the last train metrics, the final eval metrics ("eval_*"),
    "step", "compile_s", "tokens_per_s", for GPT models with a sample length "sample", and
    the final "state" with the "trainer" that ran it (`trainer.host_model(state)`, evaluation).
    With `config.init_from` a fresh run starts from that converted checkpoint's params (its
    architecture replaces config.model's, each change logged); a resumed run ignores it.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file: pass a directory (it is created).")
    config = convert.resolve_init_from(config)  # a pretrained model's architecture, if any
    trainer = create_trainer(config)
    steps = int(config.train.steps)
    train_it = iter(
        data_lib.make_dataset(
            config.data,
            "train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    ckpt = Checkpointer.from_config(config.checkpoint, os.path.join(workdir, "checkpoints"))
    init = trainer.init_state
    if config.get("init_from"):  # only for a fresh run: a checkpoint in workdir resumes instead
        init = functools.partial(trainer.init_state_from, config.init_from)
    try:
        state, start = ckpt.restore_or_init(trainer.abstract, init, train_it)
    except BaseException:
        ckpt.close()  # e.g. a checkpoint of another config: refused, and nothing was written
        raise
    writer = metrics_lib.MetricWriter(workdir)
    log.info(
        "%s: %s params, policy %s, mesh %s, starting at step %d",
        config.model.name,
        f"{trainer.n_params:,}",
        trainer.policy,
        dict(trainer.mesh.shape),
        start,
    )
    tokens = tokens_per_step(config)
    flops_token = flops_per_token(config, trainer.n_params)
    peak = metrics_lib.device_peak_flops()
    bar = _progress(steps, start)
    result: dict[str, Any] = {"step": start}
    try:
        if config.get("init_from") and start == 0:
            # The pretrained model's own held-out loss: the baseline the fine-tuning improves.
            ev = trainer.evaluate(state.params, fp8_meta=state.fp8_meta)
            ev = writer.write(0, ev, prefix="eval/")
            result.update({"init_" + k.replace("/", "_"): v for k, v in ev.items()})
            _report(bar, 0, ev)
        batch = trainer.global_batch(next(train_it)) if start < steps else None
        if batch is not None:
            result["compile_s"] = trainer.compile(state, batch)
        t0, steps_timed = time.perf_counter(), 0
        for step in range(start + 1, steps + 1):
            state, metrics = trainer.step(state, batch)
            steps_timed += 1
            if step < steps:
                batch = trainer.global_batch(next(train_it))  # overlaps with the step
            if bar is not None:
                bar.update(1)
            if step % config.train.log_every == 0 or step == steps:
                metrics = jax.device_get(metrics)
                dt = (time.perf_counter() - t0) / steps_timed
                tps = tokens / dt
                row = {**metrics, "step_time_s": dt, "tokens_per_s": tps}
                util = metrics_lib.mfu(tps, flops_token, peak, jax.device_count())
                if flops_token is not None and util is not None:
                    row["mfu"] = util
                row = writer.write(step, row, prefix="train/")
                result.update({k.removeprefix("train/"): v for k, v in row.items()})
                _report(bar, step, row)
                t0, steps_timed = time.perf_counter(), 0
            if step % config.train.eval_every == 0 or step == steps:
                ev = trainer.evaluate(state.params, fp8_meta=state.fp8_meta)
                ev = writer.write(step, ev, prefix="eval/")
                result.update({k.replace("/", "_"): v for k, v in ev.items()})
                _report(bar, step, ev)
            drift_every = config.train.drift_every or config.train.eval_every
            drift_on = drift_every > 0 and trainer.has_drift_reference
            if drift_on and (step % drift_every == 0 or step == steps):
                dr = trainer.drift(state.params, state.fp8_meta)
                dr = writer.write(step, dr, prefix="drift/")
                result.update({k.replace("/", "_"): v for k, v in dr.items()})
            ckpt.save(step, state, train_it, force=step == steps)
            result["step"] = step
            if step < steps and ckpt.reached_preemption(step):
                # The save above was forced by the notice; `close()` below waits for it.
                log.warning("Preempted: saved step %d. Rerun the same command to resume.", step)
                result["preempted"] = True
                break
        if start >= steps:
            ev = trainer.evaluate(state.params, fp8_meta=state.fp8_meta)
            result.update({f"eval_{k}": v for k, v in ev.items()})
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
    if config.model.name == "gpt" and config.train.sample_tokens > 0 and "preempted" not in result:
        result["sample"] = sample_text(trainer, state, config.train.sample_tokens)
    result["state"] = state
    result["trainer"] = trainer
    return result


def _report(bar, step: int, row: dict) -> None:
    if jax.process_index() != 0:
        return
    keys = [k for k in row if k.split("/")[-1] in ("loss", "accuracy", "perplexity", "mfu")]
    keys += [k for k in row if k.endswith(("tokens_per_s", "skipped"))]
    text = f"step {step:6d} " + " ".join(f"{k} {_fmt(row[k])}" for k in keys)
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sample_text(trainer: Trainer, state: TrainState, num_tokens: int, prompt: str = "And ") -> str:
    """Samples `num_tokens` bytes (temperature 0.8) from a GPT after `prompt`; returns the text."""
    from bf16jax.models.gpt import generate

    model = trainer.host_model(state)
    ids = np.asarray(data_lib.encode(prompt), np.int32)
    key = jax.random.fold_in(jax.random.key(trainer.config.seed), 0x5A)
    out = generate(
        model, ids, num_tokens, key=key, temperature=0.8, vocab_limit=data_lib.VOCAB_SIZE
    )
    return data_lib.decode(out)
