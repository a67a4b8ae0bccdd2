"""The fault harness (tests/fault_harness.py) on this checkout: runs that survive.

kill -9 at random points (half of them while an async save is in flight), SIGTERM and SIGINT in
one workdir, each run resuming the previous one: every resume starts from the newest committed
checkpoint, every checkpoint written after a resume and the final state equal an uninterrupted
run's bit for bit (every leaf), and metrics.jsonl / TensorBoard hold each step once. Damaged
newest checkpoints (flipped bytes, truncated / deleted files) are never restored silently. A run
whose updates overflow stops with exit 3. A full disk is one line and exit 2, and loses nothing.
"""

import json
import shutil

import pytest
from fault_harness import (
    EVERY,
    STEPS,
    Harness,
    damage_trials,
    kill_chain,
    nonfinite_trial,
    reference,
    summarize_damage,
)
from fault_reading import committed_steps, saved_state, traceback_lines


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("faults"))
    return h, reference(h)


@pytest.mark.slow  # 11 processes: ~1 min of CPU
def test_kill_9_sigterm_sigint_resume_bit_identical(harness):
    h, ref = harness
    out = kill_chain(h, ref, kills=8, seed=0)
    detail = out.pop("detail")
    print(json.dumps(out, indent=1))
    assert out["kills"] == 8 and out["kills_during_save"] >= 4, detail
    assert out["faults_delivered"] == out["trials"], detail  # none ran to its end first
    assert out["resumed_from_newest_committed"] == out["trials"] == 10, detail
    assert out["mid_run_resumes_checked"] == out["trials"], detail
    assert out["bit_identical_after_resume"] == out["trials"], detail
    assert out["final_exit"] == 0
    assert out["final_leaves"] > 60 and out["final_leaves_differing"] == 0
    assert out["metric_rows_differing"] == 0
    assert out["duplicate_metric_rows"] == out["duplicate_tensorboard_events"] == 0
    for sig in out["signals"]:
        assert sig["exit"] == 75, sig  # PREEMPTED_EXIT: not 0, not killed by the signal
        assert sig["saved_current_step"] and sig["traceback_lines"] == 0, sig
        assert sig["exit_s"] < 25, sig  # train.preemption_grace_s


def test_damaged_newest_checkpoint_is_never_restored_silently(harness, tmp_path, caplog):
    _, ref = harness
    counts = {"flip": 12, "truncate": 4, "delete": 4, "only flip": 3}
    rows = damage_trials(ref, tmp_path, counts, seed=1)
    print(json.dumps(summarize_damage(rows), indent=1))
    for row in rows:
        if row["kind"] == "only flip":  # no older checkpoint to fall back to
            assert row["outcome"] in ("error", "restored unchanged"), row
            if row["outcome"] == "error":
                assert "No checkpoint in" in row["error"] and "verifies" in row["error"], row
                assert row["error"].startswith("ValueError"), row  # -> exit 2, one line
        else:
            assert row["outcome"] in ("fell back", "restored unchanged"), row
    fell_back = [r for r in rows if r["outcome"] == "fell back"]
    assert len(fell_back) >= 10  # most damage is caught, not harmless
    assert f"checkpoint step {STEPS} in" in caplog.text
    assert f"Resumed from step {STEPS - EVERY}, the newest checkpoint that verifies" in caplog.text


@pytest.mark.slow
def test_overflowing_updates_stop_with_exit_3_and_finite_checkpoints(harness):
    h, _ = harness
    out = nonfinite_trial(h)
    print(json.dumps(out, indent=1))
    assert out["exit"] == 3, out
    assert out["traceback_lines"] == 0
    assert out["message"].startswith("error: steps ") and "25 steps in a row" in out["message"]
    assert out["steps_skipped"] == 25 and out["nonfinite_checkpoints"] == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing(harness, tmp_path):
    h, ref = harness
    workdir = tmp_path / "run"
    start = STEPS - 2 * EVERY
    shutil.copytree(ref / "checkpoints" / str(start), workdir / "checkpoints" / str(start))
    before = saved_state(workdir / "checkpoints" / str(start))
    # Files past 16 KB cannot grow: the next checkpoint's array file (~260 KB) fails to write.
    done = h.run_piped(workdir, file_limit=16 << 10)
    err = done.stderr
    assert done.returncode == 2, err[-3000:]
    assert traceback_lines(err) == 0, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: writing failed: file too large"), last
    assert "rerun the same command to resume" in last
    assert committed_steps(workdir)[0] == start
    after = saved_state(workdir / "checkpoints" / str(start))
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
