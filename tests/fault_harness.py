"""Fault harness: kill -9, SIGTERM, SIGINT, damaged checkpoints and non-finite runs of a tiny GPT.

Every run is `python -m bf16jax.main` in its own process (2 fake CPU devices, a compilation cache
shared by the runs of one harness). A chain of runs in one workdir is killed at random points
(several while an async save is in flight) and resumed each time; each checkpoint written after
a resume, and the final state, is compared leaf by leaf, bit for bit, with an uninterrupted run.
Checkpoints are read with Orbax directly (NumPy arrays), not with bf16jax, so the same harness
measures any checkout of the code: `tests/test_faults.py` runs it on this one, and

    .venv/bin/python tests/fault_harness.py [--code=DIR] [--kills=8] [--flips=40]

prints the figures (JSON) for the checkout at DIR, e.g. main before a change
(docs/guides/faults.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cli_runs import REPO, TINY_OVERRIDES, cli_env, printed_step
from fault_reading import (
    committed_steps,
    data_position,
    differing_leaves,
    duplicate_rows,
    leaves_by_name,
    metric_rows,
    saved_state,
    saving_now,
    started_at,
    tensorboard_duplicates,
    traceback_lines,
    train_rows,
)

CONFIG = "configs/gpt_tiny.py"
STEPS, EVERY = 30, 3
# gpt_tiny shrunk to ~22k params; fp32 (no BF16-vs-FP32 drift program to compile); a constant LR,
# so a run's schedule does not depend on where it was resumed.
OVERRIDES = (
    *TINY_OVERRIDES["gpt_tiny"],
    "--config.precision=fp32",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=1000",
    "--config.train.eval_steps=1",
    "--config.train.sample_tokens=0",
    "--config.train.diagnostics=false",
    f"--config.checkpoint.every_steps={EVERY}",
)


@dataclass
class Harness:
    """Runs `bf16jax.main` of the checkout `code` (default: this repository) in subprocesses."""

    root: Path
    code: Path = REPO
    devices: int = 2
    runs: int = 0  # processes started (for the cost line)

    def env(self, **extra: str) -> dict[str, str]:
        env = cli_env(self.devices, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = str(self.code)
        # The suite's cache if it has one (tests/conftest.py), else one for this harness.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.root / "jax_cache"))
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        return env

    def start(self, workdir: Path, *extra: str, name: str = "run") -> subprocess.Popen:
        self.runs += 1
        log = self.root / "logs" / f"{self.runs:03d}_{name}"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bf16jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
        with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
            proc = subprocess.Popen(
                [*cmd, *OVERRIDES, *extra],
                cwd=self.code,
                env=self.env(),
                stdout=out,
                stderr=err,
            )
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def run_piped(self, workdir: Path, *extra: str, file_limit: int | None = None) -> Finished:
        """A run whose output goes through pipes; `file_limit`: no file it writes may grow past
        that many bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, a full disk)."""
        self.runs += 1
        args = [f"--config={CONFIG}", f"--workdir={workdir}", *OVERRIDES, *extra]
        cmd = [sys.executable, "-m", "bf16jax.main", *args]
        if file_limit is not None:  # set in a wrapper that execs: no fork of a threaded process
            wrap = (
                "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit}, {file_limit})); "
                "os.execv(sys.executable, [sys.executable, '-m', 'bf16jax.main', *sys.argv[1:]])"
            )
            cmd = [sys.executable, "-c", wrap, *args]
        proc = subprocess.run(
            cmd, cwd=self.code, env=self.env(), capture_output=True, text=True, timeout=300
        )
        return Finished(proc.returncode, proc.stdout, proc.stderr)

    def run(self, workdir: Path, *extra: str, name: str = "run", timeout: int = 300) -> Finished:
        proc = self.start(workdir, *extra, name=name)
        return finish(proc, timeout)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0


def finish(proc: subprocess.Popen, timeout: float = 300, started: float | None = None) -> Finished:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = proc.log  # type: ignore[attr-defined]
    took = time.monotonic() - started if started is not None else 0.0
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    return Finished(proc.returncode, out, err, took)


# ----------------------------------------------------------------------------- the reference
def reference(h: Harness) -> Path:
    """An uninterrupted run that keeps every checkpoint (the ground truth at each saved step)."""
    workdir = h.root / "reference"
    if not committed_steps(workdir):
        done = h.run(workdir, "--config.checkpoint.max_to_keep=1000", name="reference")
        if done.returncode != 0:
            raise RuntimeError(f"the reference run failed:\n{done.stderr[-3000:]}")
    return workdir


# ----------------------------------------------------------------------------- kill -9 chain
@dataclass
class Trial:
    kind: str  # "kill -9", "kill -9 during save", "SIGTERM", "SIGINT"
    committed_before: list[int]
    during_save: bool = False
    returncode: int | None = None
    exit_s: float | None = None  # signal -> exit
    saved_on_signal: bool | None = None
    traceback_lines: int = 0
    resumed_at: int | None = None  # the step the next run started from
    expected_resume: int = 0
    first_write: int | None = None  # the first checkpoint committed after this trial's resume
    identical: bool | None = None  # that checkpoint (state + data position) == the reference's
    notes: list[str] = field(default_factory=list)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 240) -> bool:
    """Polls `condition()` every ~2 ms until True (returns True) or the process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _printed_step(proc: subprocess.Popen) -> int:
    """The last step this process printed (its own progress, not the workdir's)."""
    return printed_step(proc.log.with_suffix(".out").read_text())  # type: ignore[attr-defined]


def _interrupt(h: Harness, workdir: Path, kind: str, rng: random.Random) -> Trial:
    """One run of the chain, stopped by `kind` at a random point; returns what happened."""
    before = committed_steps(workdir)
    trial = Trial(kind, before)
    resume = before[-1] if before else 0
    stale = set(saving_now(workdir))  # left by an earlier kill: not this run's save
    proc = h.start(workdir, name=kind.replace(" ", "_"))
    if kind == "kill -9 during save":
        return _kill_during_save(proc, workdir, trial, stale)
    # Some steps into this run (before the end): after a random number of printed steps.
    target = min(resume + rng.randint(1, 2 * EVERY + 1), STEPS - 1)
    if not _wait_for(proc, lambda: _printed_step(proc) >= target):
        trial.notes.append("the run ended before the fault")
        trial.returncode = finish(proc).returncode
        return trial
    if kind == "kill -9":
        time.sleep(rng.uniform(0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        trial.during_save = bool(set(saving_now(workdir)) - stale)
        trial.returncode = finish(proc).returncode
        return trial
    logged = _printed_step(proc)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM if kind == "SIGTERM" else signal.SIGINT)
    done = finish(proc, timeout=120, started=sent)
    trial.returncode, trial.exit_s = done.returncode, round(done.seconds, 2)
    trial.traceback_lines = traceback_lines(done.stderr)
    after = committed_steps(workdir)
    trial.saved_on_signal = bool(after) and after[-1] >= logged  # the step it was on, saved
    return trial


def _kill_during_save(proc, workdir: Path, trial: Trial, stale: set[str]) -> Trial:
    """kill -9 while an async save is in flight. A save of the tiny model can commit between
    seeing its temporary directory and the kill, so the process is frozen first (SIGSTOP: no
    thread moves) and looked at again: still saving, it is killed; committed, it runs on
    (SIGCONT) to the next save. The run ending first is a note, as for the other faults."""
    while _wait_for(proc, lambda: bool(set(saving_now(workdir)) - stale)):
        os.kill(proc.pid, signal.SIGSTOP)
        if set(saving_now(workdir)) - stale:
            os.kill(proc.pid, signal.SIGKILL)
            trial.during_save = bool(set(saving_now(workdir)) - stale)
            trial.returncode = finish(proc).returncode
            return trial
        trial.notes.append("a save committed before the freeze; waiting for the next one")
        os.kill(proc.pid, signal.SIGCONT)
    trial.notes.append("the run ended before the fault")
    trial.returncode = finish(proc).returncode
    return trial


def kill_chain(h: Harness, ref: Path, kills: int, seed: int = 0) -> dict:
    """`kills` kill -9 (half of them during a save), one SIGTERM and one SIGINT, in one workdir;
    every run resumes the previous one; then a last run completes. Compares with `ref`."""
    rng = random.Random(seed)
    workdir = h.root / "chain"
    kinds = ["kill -9 during save" if i % 2 == 0 else "kill -9" for i in range(kills)]
    kinds[kills // 2 : kills // 2] = ["SIGTERM"]
    kinds += ["SIGINT"]
    trials: list[Trial] = []
    written: list[list[int]] = []  # checkpoints each run committed (run i ended trial i)
    verdicts: dict[int, bool | None] = {}  # step -> equal to the reference (read at once:
    ref_steps = set(committed_steps(ref))  # retention may delete it later)

    def note_new(before: set[int]) -> None:
        new = sorted(set(committed_steps(workdir)) - before)
        written.append(new)
        for step in new:
            verdicts[step] = _same_checkpoint(workdir, ref, step, ref_steps)

    for kind in kinds:
        before = set(committed_steps(workdir))
        trial = _interrupt(h, workdir, kind, rng)
        note_new(before)
        after = committed_steps(workdir)
        trial.expected_resume = after[-1] if after else 0
        if trials:
            trials[-1].resumed_at = _resumed_at(h)
        trials.append(trial)
    before = set(committed_steps(workdir))
    final = h.run(workdir, name="final")
    note_new(before)
    trials[-1].resumed_at = started_at(final.stderr)
    # The first checkpoint committed after trial i's resume was written by a later run.
    for i, trial in enumerate(trials):
        later = [s for new in written[i + 1 :] for s in new if verdicts.get(s) is not None]
        if later:
            trial.first_write = later[0]
            trial.identical = verdicts[later[0]]
    return _chain_summary(workdir, ref, trials, final)


def _resumed_at(h: Harness) -> int | None:
    log = sorted((h.root / "logs").glob("*.err"))[-1]
    return started_at(log.read_text())


def _same_checkpoint(workdir: Path, ref: Path, step: int, ref_steps: set[int]) -> bool | None:
    step_dir = workdir / "checkpoints" / str(step)
    if step not in ref_steps or not step_dir.exists():
        return None  # e.g. an extra save on SIGTERM: compared through the next periodic one
    ours, theirs = saved_state(step_dir), saved_state(ref / "checkpoints" / str(step))
    return not differing_leaves(ours, theirs) and data_position(step_dir) == data_position(
        ref / "checkpoints" / str(step)
    )


def _chain_summary(workdir: Path, ref: Path, trials: list[Trial], final: Finished) -> dict:
    ours = saved_state(workdir / "checkpoints" / str(STEPS))
    theirs = saved_state(ref / "checkpoints" / str(STEPS))
    bad = differing_leaves(ours, theirs)
    rows, ref_rows = metric_rows(workdir), metric_rows(ref)
    a, b = train_rows(rows), train_rows(ref_rows)
    kills = [t for t in trials if t.kind.startswith("kill")]
    signals = [t for t in trials if not t.kind.startswith("kill")]
    return {
        "kills": len(kills),
        "kills_during_save": sum(t.during_save for t in kills),
        "resumed_from_newest_committed": sum(t.resumed_at == t.expected_resume for t in trials),
        "trials": len(trials),
        "faults_delivered": sum("the run ended before the fault" not in t.notes for t in trials),
        "mid_run_resumes_checked": sum(t.identical is not None for t in trials),
        "bit_identical_after_resume": sum(bool(t.identical) for t in trials),
        "final_exit": final.returncode,
        "final_leaves": len(theirs),
        "final_leaves_differing": len(bad),
        "metric_rows_differing": sum(a.get(s) != b[s] for s in b),
        "duplicate_metric_rows": duplicate_rows(rows),
        "duplicate_tensorboard_events": tensorboard_duplicates(workdir),
        "signals": [
            {
                "signal": t.kind,
                "exit": t.returncode,
                "exit_s": t.exit_s,
                "saved_current_step": t.saved_on_signal,
                "traceback_lines": t.traceback_lines,
            }
            for t in signals
        ],
        "detail": [t.__dict__ for t in trials],
    }


# ----------------------------------------------------------------------------- damaged checkpoints
def _damage(step_dir: Path, kind: str, rng: random.Random) -> str:
    """Flips one byte of / truncates / deletes a random file (weighted by size) of a step."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    sizes = [p.stat().st_size for p in files]
    path = rng.choices(files, weights=sizes)[0]
    rel = str(path.relative_to(step_dir))
    if kind == "flip":
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        return f"{rel}@{offset}"
    if kind == "truncate":
        size = rng.randrange(len(path.read_bytes()))
        with open(path, "r+b") as f:
            f.truncate(size)
        return f"{rel}->{size}B"
    path.unlink()
    return rel


def damage_trials(ref: Path, work: Path, counts: dict[str, int], seed: int = 0) -> list[dict]:
    """Damages the newest of the last two reference checkpoints, restores with this process's
    bf16jax (`Checkpointer.restore_or_init`), and classifies the outcome. Runs in-process: call
    it from a process whose `bf16jax` is the checkout under test."""
    import traceback

    from bf16jax.checkpoint.manager import Checkpointer
    from bf16jax.config import load_config
    from bf16jax.data import datasets as data_lib
    from bf16jax.training.trainer import create_trainer

    overrides = [o.removeprefix("--config.") for o in OVERRIDES]
    code = Path.cwd() if (Path.cwd() / CONFIG).exists() else REPO  # the checkout under test
    config = load_config(str(code / CONFIG), overrides)
    trainer = create_trainer(config)
    newest, older = STEPS, STEPS - EVERY
    truth = {s: saved_state(ref / "checkpoints" / str(s)) for s in (older, newest)}
    rng = random.Random(seed)
    results = []
    for kind, count in counts.items():
        for i in range(count):
            only = kind.startswith("only ")
            damage = kind.removeprefix("only ")
            ckpts = work / f"{kind.replace(' ', '_')}_{i}" / "checkpoints"
            for s in (newest,) if only else (older, newest):
                shutil.copytree(ref / "checkpoints" / str(s), ckpts / str(s))
            where = _damage(ckpts / str(newest), damage, rng)
            it = iter(data_lib.make_dataset(config.data, "train"))
            row = {"kind": kind, "where": where}
            try:
                ckpt = Checkpointer(ckpts)
                state, step = ckpt.restore_or_init(trainer.abstract, trainer.init_state, it)
                ckpt.close()
                got = leaves_by_name(state)
                row["step"] = step
                if step in truth:
                    bad = differing_leaves(got, truth[step])
                    row["leaves_differing"] = len(bad)
                    floats = [got[k] for k in bad if np.issubdtype(got[k].dtype, np.floating)]
                    row["nonfinite"] = any(not np.isfinite(x).all() for x in floats)
                    row["outcome"] = (
                        ("fell back" if step == older else "restored unchanged")
                        if not bad
                        else "silently changed"
                    )
                else:
                    row["outcome"] = f"restored step {step}"
            except Exception as e:  # noqa: BLE001 - classified and reported
                row["outcome"] = "error"
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                row["traceback_lines"] = len(traceback.format_exc().splitlines())
            results.append(row)
    return results


def summarize_damage(rows: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        kind = out.setdefault(row["kind"], {})
        kind[row["outcome"]] = kind.get(row["outcome"], 0) + 1
    return out


# ----------------------------------------------------------------------------- start-up leftovers
def leftover_trials(h: Harness, ref: Path) -> dict:
    """An uncommitted step directory above the newest checkpoint, and a stale Orbax temporary."""
    out = {}
    for name in ("uncommitted", "stale_tmp"):
        workdir = h.root / f"leftover_{name}"
        for s in (STEPS - 2 * EVERY, STEPS - EVERY):
            shutil.copytree(ref / "checkpoints" / str(s), workdir / "checkpoints" / str(s))
        junk = (
            workdir
            / "checkpoints"
            / (str(STEPS - 1) if name == "uncommitted" else f"{STEPS + 7}.orbax-checkpoint-tmp-99")
        )
        shutil.copytree(ref / "checkpoints" / str(STEPS - EVERY), junk)
        (junk / "commit_success.txt").unlink()
        first = h.run(workdir, name=name)
        again = h.run(workdir, name=f"{name}_again")
        out[name] = {
            "exits": [first.returncode, again.returncode],
            "traceback_lines": traceback_lines(first.stderr),
            "left_in_place": junk.exists(),
            "completed": committed_steps(workdir)[-1:] == [STEPS],
            "message": _warning_about(first.stderr, junk.name),
        }
    return out


def _warning_about(stderr: str, name: str) -> str:
    lines = [ln for ln in stderr.splitlines() if name in ln]
    return lines[0][-300:] if lines else ""


# ----------------------------------------------------------------------------- non-finite
def nonfinite_trial(h: Harness) -> dict:
    """learning_rate=1e30 in FP32: the first update overflows; what does the run do?"""
    workdir = h.root / "nonfinite"
    done = h.run(workdir, "--config.optim.learning_rate=1e30", name="lr1e30")
    rows = train_rows(metric_rows(workdir))
    saved = committed_steps(workdir)
    nonfinite_ckpts = 0
    for s in saved:
        state = saved_state(workdir / "checkpoints" / str(s))
        nonfinite_ckpts += any(
            not np.isfinite(x).all() for x in state.values() if np.issubdtype(x.dtype, np.floating)
        )
    last_line = done.stderr.strip().splitlines()[-1:] or [""]
    return {
        "exit": done.returncode,
        "steps_run": max(rows, default=0),
        "steps_skipped": max((r.get("train/skipped", 0) for r in rows.values()), default=0),
        "checkpoints": saved,
        "nonfinite_checkpoints": nonfinite_ckpts,
        "message": last_line[0],
        "traceback_lines": traceback_lines(done.stderr),
    }


# ----------------------------------------------------------------------------- the figures
def figures(code: Path, root: Path, kills: int, flips: int, seed: int) -> dict:
    h = Harness(root, code=code)
    start = time.monotonic()
    ref = reference(h)
    out = {"code": str(code), "chain": kill_chain(h, ref, kills, seed)}
    out["leftovers"] = leftover_trials(h, ref)
    out["nonfinite"] = nonfinite_trial(h)
    counts = {"flip": flips, "truncate": 10, "delete": 10, "only flip": 5}
    worker = subprocess.run(
        [sys.executable, __file__, "--damage-worker", str(ref), str(root / "damage"),
         json.dumps(counts), str(seed)],
        env=h.env(), cwd=code, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if worker.returncode != 0:
        raise RuntimeError(worker.stderr[-3000:])
    rows = json.loads(worker.stdout.strip().splitlines()[-1])
    out["damage"] = summarize_damage(rows)
    out["damage_detail"] = rows
    out["processes"] = h.runs + 1
    out["wall_s"] = round(time.monotonic() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout to measure")
    parser.add_argument("--root", type=Path, default=None, help="scratch dir (default: a tmp)")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--flips", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--damage-worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.damage_worker:
        ref, work, counts, seed = args.damage_worker
        rows = damage_trials(Path(ref), Path(work), json.loads(counts), int(seed))
        print(json.dumps(rows))
        return
    import tempfile

    root = args.root or Path(tempfile.mkdtemp(prefix="bf16jax_faults_"))
    result = figures(args.code.resolve(), root, args.kills, args.flips, args.seed)
    detail = {k: result.pop(k) for k in ("damage_detail",)}
    result["chain"].pop("detail")
    print(json.dumps(result, indent=1))
    (root / "figures.json").write_text(json.dumps({**result, **detail}, indent=1))


if __name__ == "__main__":
    main()
