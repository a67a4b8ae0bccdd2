"""The training loop around `bf16jax.training.trainer.Trainer`: data, checkpoints, metrics, eval,
samples.

`train_and_evaluate(config, workdir)` is what `python -m bf16jax.main` runs. Start-up refuses
what it can before anything is written (`start_run`: the workdir, the config, every batch's
sharding, the eval split, a config change against the checkpoint's), logs the resolved config,
then resumes from the newest checkpoint that verifies (state and data position). The loop logs
train metrics every `train.log_every` steps (JSONL, TensorBoard, and a progress line: step,
loss, learning rate, step time, throughput, MFU, ETA; under a progress bar on a terminal),
evaluates every `train.eval_every` steps, runs the FP32 drift check, checkpoints, and samples
text from GPT models at the end. Only process 0 writes metrics.

Step time, throughput (tokens/s for GPT and T5, images/s for ViT) and MFU (`bf16jax.training.flops`)
count training steps only: the clock stops, once the device has finished the step, for
evaluation, the drift check, checkpointing and logging, and the first compile is before it.

Exactness: a checkpoint of step k holds the data position of the first batch step k+1 consumes
(captured before the next batch is fetched ahead), so a resume from any checkpoint is bit-exact.
Faults: SIGTERM / SIGINT finish the step, save it and return `preempted=True`
(`bf16jax.training.preemption`); `train.max_skips_in_a_row` skipped (non-finite) steps raise
`TrainingDiverged`, or with `train.nonfinite_rollbacks` roll back to the last good checkpoint
and skip the data those steps consumed (as large runs do after a loss spike). A step that does
not log never waits on the device: skip counters are read on logging steps and saves, so the
limit is acted on up to `train.log_every - 1` steps after it is reached (`_SkipWatch`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.config import config_help
from bf16jax.data import datasets as data_lib
from bf16jax.interop import convert
from bf16jax.training import flops, preflight
from bf16jax.training import metrics as metrics_lib
from bf16jax.training import workdir as workdir_lib
from bf16jax.training.preemption import StopRequest
from bf16jax.training.trainer import Trainer, TrainState, create_trainer

log = logging.getLogger(__name__)

__all__ = [
    "train_and_evaluate",
    "TrainingDiverged",
    "tokens_per_step",
    "flops_per_token",
    "sample_text",
]


class TrainingDiverged(RuntimeError):
    """`train.max_skips_in_a_row` steps in a row were skipped (non-finite); nothing was saved
    after the last good checkpoint. `bf16jax.main` exits with code 3."""


def tokens_per_step(config) -> int:
    """Tokens per global batch (GPT: B*T, T5: B*(enc+dec)); examples for image models."""
    d, name = config.data, config.model.name
    if name == "gpt":
        return int(d.batch_size * d.seq_len)
    if name == "t5":
        return int(d.batch_size * (d.enc_len + d.dec_len))
    return int(d.batch_size)  # images: examples


def flops_per_token(config, n_params: int) -> float | None:
    """Training FLOPs per token for GPT models (see bf16jax.training.metrics); None for the
    others."""
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


@dataclasses.dataclass
class Run:
    """A started run: what the loop reads and advances."""

    config: ml_collections.ConfigDict
    workdir: str
    trainer: Trainer
    ckpt: Checkpointer
    writer: metrics_lib.MetricWriter
    train_it: Any
    state: TrainState
    start: int  # the step restored from (0: fresh)
    rollbacks: int = 0

    @property
    def steps(self) -> int:
        return int(self.config.train.steps)

    def close(self) -> None:
        try:
            self.ckpt.close()
        finally:
            self.writer.close()


def start_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks everything it can, then restores (or initializes) the run in `workdir`.

    Raises:
      ValueError: bad config / workdir / batches, a config change that the checkpoint refuses,
        no checkpoint that verifies, or `train.steps` below the restored step. Nothing in
        `workdir` is changed then (beyond moving unfinished saves to the quarantine).
    """
    workdir_lib.check_workdir(workdir)
    config = convert.resolve_init_from(config)  # a pretrained model's architecture, if any
    trainer = create_trainer(config)
    preflight.check_data(config, trainer.mesh)
    train_it = iter(
        data_lib.make_dataset(
            config.data,
            "train",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            model=config.model.name,
        )
    )
    ckpt = Checkpointer.from_config(config.checkpoint, f"{workdir.rstrip('/')}/checkpoints")
    try:
        resuming = ckpt.latest_step() is not None
        workdir_lib.check_config_change(config, workdir, resuming)
        init = trainer.init_state
        if config.get("init_from"):  # only for a fresh run: a checkpoint in workdir resumes
            init = functools.partial(trainer.init_state_from, config.init_from)
        state, start = ckpt.restore_or_init(trainer.abstract, init, train_it)
        steps = int(config.train.steps)
        if start > steps:
            raise ValueError(
                f"config.train.steps={steps} is below step {start}, where the checkpoint in "
                f"{ckpt.directory} resumes: pass --config.train.steps={start} or more, or a new "
                "--workdir."
            )
        workdir_lib.write_config(config, workdir)
    except BaseException:
        ckpt.close()  # e.g. a checkpoint of another config: refused, and nothing was written
        raise
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    if jax.process_index() == 0:
        log.info("config (also in %s/config.json):\n%s", workdir, config_help(config))
    log.info(
        "%s: %s params, policy %s, mesh %s, starting at step %d",
        config.model.name,
        f"{trainer.n_params:,}",
        trainer.policy,
        dict(trainer.mesh.shape),
        start,
    )
    return Run(config, workdir, trainer, ckpt, writer, train_it, state, start)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest good checkpoint) and evaluates.

    Writes `workdir/config.json`, `workdir/metrics.jsonl`, TensorBoard events in `workdir/tb`
    and checkpoints in `workdir/checkpoints`. Returns the last train metrics, the final eval
    metrics ("eval_*"), "step", "compile_s", "tokens_per_s", for GPT models with a sample
    length "sample", the final "state" with the "trainer" that ran it, and `preempted=True`
    when a signal stopped it (the step it reached is saved).

    Raises:
      TrainingDiverged: too many skipped steps in a row (see the module docstring).
      ValueError: bad input, refused at start-up (see `start_run`).
    """
    run = start_run(config, workdir)
    grace = float(config.train.get("preemption_grace_s", 25.0))
    check_every = int(config.train.get("preemption_check_every", 1))
    try:
        with StopRequest(grace, check_every=check_every) as stop:
            result = _train(run, stop)
    finally:
        run.close()
    if config.model.name == "gpt" and config.train.sample_tokens > 0 and "preempted" not in result:
        result["sample"] = sample_text(run.trainer, run.state, config.train.sample_tokens)
    result["state"] = run.state
    result["trainer"] = run.trainer
    return result


def _train(run: Run, stop: StopRequest) -> dict[str, Any]:
    config, trainer, steps = run.config, run.trainer, run.steps
    result: dict[str, Any] = {"step": run.start}
    if run.start >= steps:
        ev = trainer.evaluate(run.state.params, fp8_meta=run.state.fp8_meta)
        result.update({f"eval_{k}": v for k, v in ev.items()})
        return result
    clock = _StepClock(flops.train_cost(config, trainer.abstract.params), run.start, steps)
    bar = _progress(steps, run.start)
    try:
        if config.get("init_from") and run.start == 0:
            # The pretrained model's own held-out loss: the baseline the fine-tuning improves.
            ev = trainer.evaluate(run.state.params, fp8_meta=run.state.fp8_meta)
            ev = run.writer.write(0, ev, prefix="eval/")
            result.update({"init_" + k.replace("/", "_"): v for k, v in ev.items()})
            _report(bar, 0, ev)
        batch = trainer.global_batch(next(run.train_it))
        plain = _runs_plain_step(run.start, steps, config.train.log_every)
        result["compile_s"] = trainer.compile(run.state, batch, plain=plain)
        clock.reset(run.start)
        step, tick = run.start, run.start
        skips = _SkipWatch(int(config.train.get("max_skips_in_a_row", 0)))
        in_flight_limit = _host_waits_each_step()
        previous = None
        while step < steps:
            logged = _is_logged(step + 1, steps, config.train.log_every)
            # The param norm and the diagnostics (swamping, gradient health) only in the steps
            # whose metrics are logged.
            clock.start()
            run.state, metrics = trainer.step(
                run.state, batch, diagnostics=logged, param_norm=logged
            )
            step, tick = step + 1, tick + 1
            skips.add(step, metrics)
            if in_flight_limit:
                # XLA:CPU runs each device's share of a collective on a shared thread pool:
                # steps left in flight together can starve an all-reduce's rendezvous (seen:
                # 6 of 8 fake devices arrived, abort after 40 s). There the host waits for the
                # previous step, as before (accelerators do not wait).
                if previous is not None:
                    jax.block_until_ready(previous)
                previous = metrics["skips_in_a_row"]
            # Where the data resumes after `step`: taken before the batch of step + 1 is fetched.
            position = run.train_it.get_state()
            if step < steps:
                batch = trainer.global_batch(next(run.train_it))  # overlaps with the step
            clock.steps += 1
            if bar is not None:
                bar.update(1)
            _log_and_evaluate(run, step, metrics, clock, bar, result)
            # Every process asks at every iteration (multi-host: they agree on one tick).
            stopping = step < steps and stop.requested(tick)
            saved = _save(run, step, metrics, position, clock, force=step == steps or stopping)
            result["step"] = step
            if stopping:
                run.ckpt.wait()  # the save above was forced: wait for it to commit
                log.warning(
                    "Stopped by %s: saved step %d. Rerun the same command to resume.",
                    stop.signal,
                    step,
                )
                result["preempted"] = True
                break
            # Skip counters are read where the host has waited for the device anyway.
            if (logged or saved) and (bad := skips.first_over_limit()) and _diverged(run, *bad):
                step = _roll_back(run, bad[0], step, bar)
                clock.reset(step)
    finally:
        if bar is not None:
            bar.close()
    return result


def _is_logged(step: int, steps: int, log_every: int) -> bool:
    """Whether `step` (counted from 1) logs its metrics, and so runs the diagnostics variant."""
    return step % log_every == 0 or step == steps


def _runs_plain_step(start: int, steps: int, log_every: int) -> bool:
    """Whether a run from `start` to `steps` has a step that is not logged: one that logs every
    step never runs the plain train step, so it need not compile it."""
    if log_every == 1:  # every step logs (and the scan below would walk all of them)
        return False
    unlogged = (s for s in range(start + 1, steps + 1) if not _is_logged(s, steps, log_every))
    return next(unlogged, None) is not None


class _StepClock:
    """Seconds spent in training steps since the last logged step, and the run's ETA.

    `pause(metrics)` waits for the device to finish the step that produced `metrics` (so its
    time is training time, whatever JAX's async dispatch has queued) before evaluation,
    checkpointing or logging; `start()` resumes at the next step.
    """

    def __init__(self, cost: flops.TrainCost, step: int, total: int):
        self.cost, self.total = cost, total
        self.peak = metrics_lib.device_peak_flops()
        self.reset(step)

    def reset(self, step: int) -> None:
        """After the compile (or a rollback): nothing timed yet; the ETA counts from here."""
        self.train_s, self.steps, self._t0 = 0.0, 0, None
        self.wall0, self.step0 = time.perf_counter(), step

    def start(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def pause(self, metrics) -> None:
        if self._t0 is not None:
            jax.block_until_ready(metrics)
            self.train_s += time.perf_counter() - self._t0
            self._t0 = None

    def row(self, step: int) -> dict[str, float]:
        """Step time, throughput and MFU (where the chip's peak is known) of the steps timed
        since the last row; then starts a new interval."""
        dt = self.train_s / max(self.steps, 1)
        row = {"step_time_s": dt, f"{self.cost.unit}_per_s": self.cost.throughput(dt)}
        util = self.cost.mfu(dt, self.peak, jax.device_count())
        if util is not None:
            row["mfu"] = util
        self.train_s, self.steps = 0.0, 0
        done = step - self.step0
        if done > 0:  # wall time per step so far, evaluation and checkpoints included
            row["eta_s"] = (time.perf_counter() - self.wall0) / done * (self.total - step)
        return row


def _log_and_evaluate(run: Run, step: int, metrics, clock: _StepClock, bar, result) -> None:
    config, trainer, state = run.config, run.trainer, run.state
    steps = run.steps
    if _is_logged(step, steps, config.train.log_every):
        clock.pause(metrics)
        timing = clock.row(step)
        eta = timing.pop("eta_s", None)
        row = {**jax.device_get(metrics), **timing}
        _check_targets(row, step, config)
        row = run.writer.write(step, row, prefix="train/")
        result.update({k.removeprefix("train/"): v for k, v in row.items()})
        _report(bar, step, row, total=steps, eta_s=eta)
    if step % config.train.eval_every == 0 or step == steps:
        clock.pause(metrics)
        ev = trainer.evaluate(state.params, fp8_meta=state.fp8_meta)
        ev = run.writer.write(step, ev, prefix="eval/")
        result.update({k.replace("/", "_"): v for k, v in ev.items()})
        _report(bar, step, ev)
    drift_every = config.train.drift_every or config.train.eval_every
    if drift_every > 0 and trainer.has_drift_reference:
        if step % drift_every == 0 or step == steps:
            clock.pause(metrics)
            dr = trainer.drift(state.params, state.fp8_meta)
            dr = run.writer.write(step, dr, prefix="drift/")
            result.update({k.replace("/", "_"): v for k, v in dr.items()})


def _save(run: Run, step: int, metrics, position, clock: _StepClock, force: bool) -> bool:
    """Saves `step` if it is due (or forced); True when it did."""
    if not (force or run.ckpt.should_save(step)):
        return False
    clock.pause(metrics)
    healthy = int(jax.device_get(metrics["skips_in_a_row"])) == 0
    run.ckpt.save(step, run.state, position, force=force, healthy=healthy)
    return True


def _host_waits_each_step() -> bool:
    """True on XLA:CPU with several devices: the loop keeps one step in flight there (its
    collectives share one thread pool; see `_train`)."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1


class _SkipWatch:
    """The `skips_in_a_row` counters of the steps not yet checked against
    `train.max_skips_in_a_row` (0: no limit, nothing kept).

    Each counter starts its copy to the host when its step is dispatched and is read only
    where the loop has waited for the device anyway (a logging step, a save), so a step that
    does not log never waits on the device. A limit reached at step s is acted on at the first
    logging step or save at or after s: at most `train.log_every - 1` steps late (skipped
    steps change no params, so the extra steps only cost their time and, after a rollback,
    their batches).
    """

    def __init__(self, limit: int):
        self.limit, self.pending = limit, []

    def add(self, step: int, metrics) -> None:
        if self.limit > 0:
            counter = metrics["skips_in_a_row"]
            counter.copy_to_host_async()
            self.pending.append((step, counter))

    def first_over_limit(self) -> tuple[int, int] | None:
        """(step, skips in a row) of the first pending step at the limit, or None; forgets
        every pending counter."""
        pending, self.pending = self.pending, []
        for step, counter in pending:
            in_a_row = int(jax.device_get(counter))
            if in_a_row >= self.limit:
                return step, in_a_row
        return None


def _diverged(run: Run, step: int, in_a_row: int) -> bool:
    """`in_a_row` steps up to `step` were skipped, at or over `train.max_skips_in_a_row`: True
    to roll back (rollbacks left and a good checkpoint before them). Raises TrainingDiverged
    to stop."""
    limit = int(run.config.train.get("max_skips_in_a_row", 0))
    first = step - in_a_row + 1
    allowed = int(run.config.train.get("nonfinite_rollbacks", 0))
    good = run.ckpt.newest_good(before=first)
    if run.rollbacks < allowed and good is not None:
        return True
    where = (
        f"the newest good checkpoint is step {good} in {run.ckpt.directory}"
        if good is not None
        else "no checkpoint was saved before they started"
    )
    fix = (
        f"rollbacks used up ({run.rollbacks} of train.nonfinite_rollbacks={allowed})"
        if allowed
        else "set train.nonfinite_rollbacks=N to roll back and skip their data instead"
    )
    raise TrainingDiverged(
        f"steps {first}-{step}: {in_a_row} steps in a row were skipped (non-finite gradients "
        f"or updates; train.max_skips_in_a_row={limit}), stopped; {where}. Lower "
        f"optim.learning_rate, check the data and the precision policy, or {fix}."
    )


def _roll_back(run: Run, bad_step: int, current: int, bar) -> int:
    """Restores the last good checkpoint before the skipped steps that ended at `bad_step`.
    The data stays where it is, so the batches of those steps (up to `current`) are skipped.
    Returns the step resumed from."""
    first = bad_step - int(run.config.train.max_skips_in_a_row) + 1
    good = run.ckpt.newest_good(before=first)
    run.rollbacks += 1
    run.ckpt.set_aside_newer(good, "rolled-back")
    run.state = run.ckpt.restore(good, run.trainer.abstract)
    run.writer.truncate(good)
    log.warning(
        "Rollback %d of %d: steps %d-%d were skipped (non-finite); restored step %d from %s; the "
        "batches of steps %d-%d are skipped.",
        run.rollbacks,
        run.config.train.nonfinite_rollbacks,
        first,
        bad_step,
        good,
        run.ckpt.directory,
        good + 1,
        current,
    )
    if bar is not None:
        bar.reset(total=run.steps)
        bar.update(good)
    return good


def _check_targets(metrics: dict, step: int, config) -> None:
    bad = float(metrics.get("invalid_targets", 0.0))
    if bad > 0:
        raise ValueError(
            f"Step {step}: {bad:.0f} training target(s) outside [0, vocab/classes) had a "
            f"positive weight (data.name={config.data.name!r}); their loss is NaN and such steps "
            "are skipped (train/skipped). Labels must be class ids; give ignored positions "
            "weight 0 (e.g. label -100 with weight 0)."
        )


def _report(bar, step: int, row: dict, total: int | None = None, eta_s: float | None = None):
    """One progress line per logged step and evaluation, on a terminal or not (batch jobs,
    notebooks): `step 100/300  loss 2.4512  lr 2.94e-03  48.1 ms/step  85.1k tokens/s  eta 0:01:36`.
    """
    if jax.process_index() != 0:
        return
    text = f"step {step:6d}" + (f"/{total}" if total else "")
    for name, show in _TRAIN_FIELDS.items():
        if f"train/{name}" in row:
            text += "  " + show(row[f"train/{name}"])
    for key, value in row.items():
        if not key.startswith("train/") and key.split("/")[-1] in _EVAL_FIELDS:
            text += f"  {key} {_fmt(value)}"
    if eta_s is not None:
        text += f"  eta {_duration(eta_s)}"
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# How each train metric shows in the progress line, in this order; and the evaluation ones.
_TRAIN_FIELDS = {
    "loss": lambda v: f"loss {v:.4f}",
    "accuracy": lambda v: f"acc {v:.4f}",
    "learning_rate": lambda v: f"lr {v:.3g}",
    "step_time_s": lambda v: f"{1e3 * v:.4g} ms/step",
    "tokens_per_s": lambda v: f"{_si(v)} tokens/s",
    "images_per_s": lambda v: f"{_si(v)} images/s",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
    "skipped": lambda v: f"skipped {int(v)}",
}
_EVAL_FIELDS = ("loss", "accuracy", "perplexity")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sample_text(trainer: Trainer, state: TrainState, num_tokens: int, prompt: str = "And ") -> str:
    """Samples `num_tokens` tokens (temperature 0.8) from a GPT after `prompt`, encoded and
    decoded with the run's tokenizer (`config.data.tokenizer`: bytes, or a pretrained one);
    returns the text."""
    from bf16jax.data.tokenizer import load_tokenizer
    from bf16jax.models.gpt import generate

    tokenizer = load_tokenizer(trainer.config.data.get("tokenizer", "") or "")
    model = trainer.host_model(state)
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    key = jax.random.fold_in(jax.random.key(trainer.config.seed), 0x5A)
    # why: a model's table may be padded past the tokenizer's ids (FLAN-T5's 32128 rows).
    limit = min(int(tokenizer.vocab_size), int(trainer.config.model.vocab_size))
    out = generate(model, ids, num_tokens, key=key, temperature=0.8, vocab_limit=limit)
    return tokenizer.decode(out)
