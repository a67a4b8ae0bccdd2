"""Runs a list of documented commands one after the other in one Python process.

`python tests/doc_driver.py PLAN.json RESULTS.json`, from the directory the commands run in.
Each step of the plan is `{"where", "argv", "env", "background", "probe"}`. `python -m MODULE`,
`python SCRIPT.py` and `python -c CODE` run in this process (`runpy`, as `__main__`, with their
own `sys.argv`); one interpreter means JAX is imported once and identical programs compile once,
which is what keeps the docs test cheap. Between steps the absl flags the command itself defined
(its `__main__` code, `bf16jax.cli`, `bf16jax.main`, the `--config.*` overrides) are removed
and the parsed state reset, so every command parses its own flags as in a fresh process;
libraries' flags (grain's, defined on import) stay. Other
programs (`tensorboard`, a `background` server) run as subprocesses. Each step's exit code,
stdout and stderr (tail) go to RESULTS.json; a step that raises records its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import time
import traceback
import urllib.request
import warnings

PYTHONS = ("python", "python3", ".venv/bin/python")


# Modules whose flags belong to a command, not to a library.
_COMMAND_MODULES = ("__main__", "bf16jax.cli", "bf16jax.main")


def _reset_flags(baseline: set[str]) -> None:
    from absl import flags

    by_module = flags.FLAGS.flags_by_module_dict()
    # absl files a flag defined by `__main__` under the script's path (`python -m bf16jax.main`
    # run here: ".../bf16jax/main.py"), so paths are commands too.
    commands = [m for m in by_module if m in _COMMAND_MODULES or m.endswith(".py")]
    owned = {f.name for m in commands for f in by_module[m]}
    for name in [n for n in flags.FLAGS if n not in baseline]:
        if name in owned or name.startswith("config.") or name == "config":
            delattr(flags.FLAGS, name)
    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()
    sys.modules.pop("config_config", None)  # ml_collections' module of the last --config


def _in_process(argv: list[str]) -> int:
    """Runs `python ARGS` here; returns its exit code."""
    args = argv[1:]
    saved = sys.argv, list(sys.path)
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules"
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = args
            sys.path.insert(0, os.path.dirname(os.path.realpath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
        return 0
    except SystemExit as e:
        code = e.code
        return 0 if code is None else (code if isinstance(code, int) else 1)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]


class _Capture(io.StringIO):
    """A command's stdout / stderr. Never closed by the command: `logging.shutdown()` closes
    absl's handler stream unless it is the current sys.stderr, which a command that redirects
    stderr itself (tests/test_bad_input.py) changes."""

    def close(self) -> None:
        pass


def _probe(url: str, proc: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    """Polls `url` until it answers 200 (the server is up); (0, body) or (1, why)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return 1, f"the server exited with {proc.returncode} before answering {url}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return (0 if r.status == 200 else 1), r.read().decode()[:2000]
        except OSError:
            time.sleep(0.5)
    return 1, f"no answer from {url} within {timeout_s:.0f} s"


def run_step(step: dict, baseline: set[str]) -> dict:
    argv, env = step["argv"], step.get("env") or {}
    saved_env = dict(os.environ)
    os.environ.update(env)  # this step's own (`NAME=value command`); restored after it
    start = time.perf_counter()
    out, err = _Capture(), _Capture()
    if step.get("background"):
        log = open(f"background_{os.getpid()}_{len(argv)}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        code, text = _probe(step["probe"], proc, step.get("timeout_s", 240))
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        out.write(text)
        err.write(open(log.name).read()[-4000:])
    elif argv[0] in PYTHONS or argv[0].endswith("/python"):
        from absl import logging as absl_logging

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            absl_logging.get_absl_handler().python_handler.stream = err
            try:
                code = _in_process(argv)
            except BaseException:  # noqa: BLE001 - a failing step is a result, not a crash
                traceback.print_exc()
                code = 1
            finally:
                absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
        _reset_flags(baseline)
    else:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=os.environ, timeout=step.get("timeout_s")
        )
        code = proc.returncode
        out.write(proc.stdout)
        err.write(proc.stderr)
    os.environ.clear()
    os.environ.update(saved_env)
    return {
        "where": step["where"],
        "argv": argv,
        "code": code,
        "seconds": round(time.perf_counter() - start, 2),
        "stdout": out.getvalue()[-6000:],
        "stderr": err.getvalue()[-6000:],
    }


def main(plan_path: str, results_path: str) -> None:
    import jax  # noqa: F401  (imported once, before the baseline of absl flags is taken)
    from absl import flags

    baseline = set(flags.FLAGS)
    with open(plan_path) as f:
        plan = json.load(f)
    results = []
    for step in plan:
        results.append(run_step(step, baseline))
        with open(results_path, "w") as f:  # rewritten after each step: a crash keeps the rest
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
