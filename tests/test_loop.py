"""bf16jax.training.loop: what a run reports while it trains.

Step time, throughput and MFU count training steps only: evaluation, the drift check and
checkpoints are made to look slow here (a fake clock jumps 100 s in each) and must not show in
them, while the ETA, which is about the whole run, must include them. The progress line is
printed at each logged step when stderr is not a terminal (as under pytest).
"""

import json
import re
import time

from tiny import tiny_gpt_config

from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.training import flops, loop, metrics
from bf16jax.training.trainer import Trainer

STEPS, LOG_EVERY = 4, 2


def test_timing_counts_training_steps_only_and_the_progress_line(tmp_path, monkeypatch, capsys):
    jump = [0.0]

    class Clock:  # loop's `time`: real time plus 100 s per evaluation / drift check / save
        @staticmethod
        def perf_counter():
            return time.perf_counter() + jump[0]

    def slow(method):
        def wrapped(*args, **kwargs):
            jump[0] += 100.0
            return method(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(loop, "time", Clock)
    for cls, name in ((Trainer, "evaluate"), (Trainer, "drift"), (Checkpointer, "save")):
        monkeypatch.setattr(cls, name, slow(getattr(cls, name)))
    peak = 1e12
    monkeypatch.setattr(metrics, "device_peak_flops", lambda device=None: peak)
    config = tiny_gpt_config(
        "bf16", steps=STEPS, log_every=LOG_EVERY, eval_every=1, drift_every=1, sample_tokens=0
    )
    config.unlock()
    config.checkpoint.every_steps = 1
    config.lock()

    result = loop.train_and_evaluate(config, str(tmp_path / "run"))

    assert jump[0] >= 100.0 * 3 * STEPS  # every step evaluated, drift-checked and saved
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/step_time_s" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    cost = flops.train_cost(config, result["trainer"].abstract.params)
    for row in train_rows:
        dt = row["train/step_time_s"]
        assert 0 < dt < 20.0, dt  # 2 x 300 s of evaluation, drift and saves are not in it
        assert row["train/tokens_per_s"] == cost.units_per_step / dt
        assert row["train/mfu"] == cost.flops_per_step / dt / (peak * 8)  # 8 fake devices
        assert "train/images_per_s" not in row
    assert "eval/perplexity" in rows[-1] or any("eval/perplexity" in r for r in rows)

    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if re.match(r"step +\d+/4 ", ln)]
    assert len(lines) == STEPS // LOG_EVERY, out
    pattern = r"loss \d\.\d{4}  acc [\d.]+  lr [\d.e-]+  [\d.]+ ms/step  [\d.]+k? tokens/s  mfu "
    assert re.search(pattern, lines[0]), lines[0]
    eta = re.search(r"eta (\d+):(\d\d):(\d\d)$", lines[0])
    # Logged at step 2 of 4 after one step's 300 s of evaluation, drift and save: 150 s per
    # step so far, 2 to go.
    assert eta and 250 <= 3600 * int(eta[1]) + 60 * int(eta[2]) + int(eta[3]) <= 400, lines[0]
    assert re.search(r"step +4  eval/loss [\d.]+  eval/accuracy [\d.]+  eval/perplexity", out)


def test_a_run_that_logs_every_step_never_builds_the_plain_step(tmp_path):
    """The plain train step is compiled only when some step is not logged (every logged step
    runs the diagnostics variant): a full compile saved, e.g. notebook runs at log_every=1."""
    config = tiny_gpt_config("bf16", steps=2, log_every=1, diagnostics=True, sample_tokens=0)
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2 and result["compile_s"] > 0
    assert "_step_fn" not in vars(result["trainer"])  # never built, never compiled
    assert "_diagnostic_step_fn" in vars(result["trainer"])
    # (start, steps, log_every) -> whether a step before the last is not logged.
    table = {(0, 4, 1): False, (0, 4, 2): True, (1, 3, 2): False, (3, 4, 2): False,
             (0, 1, 5): False, (2, 5, 3): True, (3, 5, 2): False, (0, 3, 3): True}  # fmt: skip
    assert {k: loop._runs_plain_step(*k) for k in table} == table


def test_steps_that_do_not_log_never_wait_and_divergence_is_caught_at_the_next_log(
    tmp_path, monkeypatch
):
    """log_every=3: steps 1, 2, 4, 5 neither wait for the device nor read from it (no param
    norm either); the skip counters of steps 1-2 (every gradient NaN) are read at step 3, the
    first logging step, which stops the run naming steps 1-2."""
    import jax
    import numpy as np
    import pytest

    config = tiny_gpt_config(steps=6, log_every=3, max_skips_in_a_row=2, eval_every=100)
    events, real_step, real_batch = [], Trainer.step, Trainer.global_batch
    real_get, real_wait = jax.device_get, jax.block_until_ready

    def step(self, state, batch, **kwargs):
        state, metrics = real_step(self, state, batch, **kwargs)
        events.append(("step", "param_norm" in metrics))
        return state, metrics

    def global_batch(self, local):
        if len([e for e in events if e[0] == "batch"]) < 2:  # the batches of steps 1 and 2
            local = dict(local, weights=np.full_like(local["weights"], np.nan))
        events.append(("batch",))
        return real_batch(self, local)

    def record(name, fn):
        def wrapped(*args, **kwargs):
            events.append((name,))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(Trainer, "global_batch", global_batch)
    assert loop._host_waits_each_step()  # 8 fake CPU devices: one step in flight ...
    monkeypatch.setattr(loop, "_host_waits_each_step", lambda: False)  # ... accelerators: none
    monkeypatch.setattr(jax, "device_get", record("read", real_get))
    monkeypatch.setattr(jax, "block_until_ready", record("wait", real_wait))
    with pytest.raises(loop.TrainingDiverged, match=r"steps 1-2: 2 steps in a row"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    steps = [i for i, e in enumerate(events) if e[0] == "step"]
    assert [events[i][1] for i in steps] == [False, False, True]  # stopped at step 3
    between = [
        {e[0] for e in events[a + 1 : b]} for a, b in zip(steps[:-1], steps[1:], strict=True)
    ]
    assert between == [{"batch"}, {"batch"}]  # after steps 1 and 2: the next batch only
    assert {"read", "wait"} <= {e[0] for e in events[steps[-1] :]}
