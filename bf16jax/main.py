"""Command-line entry point: `python -m bf16jax.main --config=configs/NAME.py --workdir=DIR`.

Any config key can be overridden (`--config.precision=bf16-pure --config.train.steps=100`); the
config is locked, so a misspelt key fails with its name instead of being ignored. Multi-host
(TPU pods): every host runs the same command; `jax.distributed` is initialized first (see
`config.mesh.distributed`). Rerunning with the same workdir resumes from its newest checkpoint.

Exit codes: 0 trained (or already done); 2 bad input, refused with one line `error: ...` that
names the problem and the fix, before anything already written is changed; 3 training diverged
(`train.max_skips_in_a_row` skipped steps in a row; the last good checkpoint is kept); 75
preempted (SIGTERM / SIGINT: the current step was saved; rerun the same command to resume);
130 a second SIGINT (stopped without saving the current step).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bf16jax.preemption import PREEMPTED_EXIT

__all__ = ["run", "main", "BAD_INPUT_EXIT", "DIVERGED_EXIT", "PREEMPTED_EXIT", "INTERRUPTED_EXIT"]

BAD_INPUT_EXIT = 2
DIVERGED_EXIT = 3
INTERRUPTED_EXIT = 130

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


class _BadInput(Exception):
    """One line for the user; exit 2."""


def main(argv) -> None:
    if len(argv) > 1:
        raise _BadInput(
            f"unexpected arguments {' '.join(argv[1:])}: pass flags only "
            "(--config=... --workdir=... --config.KEY=VALUE)."
        )
    config = _CONFIG.value
    if not hasattr(config, "lock"):
        raise _BadInput(
            f"--config={flags.FLAGS['config'].config_filename}: get_config() returned a "
            f"{type(config).__name__}, not an ml_collections.ConfigDict."
        )
    # Before anything touches a device: on a pod every host must join first.
    from bf16jax import sharding

    sharding.maybe_initialize_distributed(config.mesh.distributed)
    import jax

    from bf16jax import loop

    # Orbax logs every save at INFO through absl, and the tracebacks of its background threads
    # at ERROR; its errors reach bf16jax as exceptions (one line each, see `run`). Keep the
    # terminal to bf16jax's own lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # Orbax's unretrieved futures
    logging.getLogger("bf16jax").setLevel(logging.INFO)
    result = loop.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        summary = {
            k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "sample"
        }
        print(json.dumps({"final": summary}, sort_keys=True))
        if "sample" in result:
            print("\n--- sample ---\n" + result["sample"] + "\n--------------")
    if result.get("preempted"):
        sys.exit(PREEMPTED_EXIT)


def _overrides(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--config.")]


def _unknown_key(argv: list[str], error: Exception) -> str:
    """The message for an `--config.X=...` override naming a key the config does not have."""
    text = str(error)
    guess = re.search(r'Did you mean "([^"]+)"', text)
    hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
    names = set(re.findall(r"\w+", text))
    bad = list(dict.fromkeys(o for o in _overrides(argv) if o.split(".")[-1] in names))
    # ml_collections names the missing field; the override that holds it is the bad one.
    which = bad[0] if len(bad) == 1 else ", ".join(bad or _overrides(argv))
    return (
        f"unknown config key {which}{hint}: the config is locked. Run with --helpfull to list "
        "every config.* flag."
    )


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its errors (exit 1, "FATAL Flags parsing error") as one line."""
    if not any(re.match(r"^--?config(=|$)", a) for a in argv[1:]):
        raise _BadInput("--config is required: pass --config=configs/NAME.py (see configs/).")
    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        raise _BadInput(f"--config={path}: no such file: pass a configs/*.py path.")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e).splitlines()[0]
        if "--config" in text and "Failed loading config file" in text:
            raise _BadInput(f"--config: {text}") from None
        raise _BadInput(f"{text.rstrip('.')}. Run with --help for the flags.") from None


_DISK = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or a size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}


def _os_error(e: OSError) -> str | None:
    if e.errno in _DISK:
        where = f" ({e.filename})" if e.filename else ""
        return (
            f"writing failed: {_DISK[e.errno]}{where}. Free space or pass a writable --workdir; "
            "rerun the same command to resume from the newest committed checkpoint."
        )
    return None


def _message(e: BaseException, argv: list[str]) -> tuple[int, str] | None:
    """(exit code, one line) for an exception the user can act on; None for a bug."""
    from bf16jax.checkpoint import CheckpointDamaged

    if isinstance(e, _BadInput):
        return BAD_INPUT_EXIT, str(e)
    if _config_error(e, argv):
        return BAD_INPUT_EXIT, _config_error(e, argv)
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED_EXIT, f"interrupted ({e or 'SIGINT'}): the current step was not saved."
    if type(e).__name__ == "TrainingDiverged":
        return DIVERGED_EXIT, str(e)
    if isinstance(e, (AttributeError, KeyError)) and _overrides(argv):
        # ml_collections raises these while applying an override of a key that does not exist.
        return BAD_INPUT_EXIT, _unknown_key(argv, e)
    if isinstance(e, OSError):
        text = _os_error(e)
        if text is None and "Failed loading config file" in str(e):
            # ml_collections defers a --config file that failed to load to its first use.
            text = f"--config: {str(e).splitlines()[0]}"
        return (BAD_INPUT_EXIT, text) if text else None
    disk = _disk_error_in(e)
    if disk is not None:
        return disk
    if isinstance(e, (ValueError, CheckpointDamaged)):  # config / data / checkpoint errors
        return BAD_INPUT_EXIT, str(e).replace("\n", " ")
    return None


def _config_file(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1].split(":", 1)[0]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _config_error(e: BaseException, argv: list[str]) -> str | None:
    """An error raised while loading / executing the --config file."""
    path = _config_file(argv)
    if path is None:
        return None
    real = os.path.realpath(path)
    if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == real:
        return f"--config={path}: syntax error at line {e.lineno}: {e.msg}. Fix the file."
    if isinstance(e, AttributeError) and "get_config" in str(e):
        return (
            f"--config={path} defines no get_config(): a config file's get_config() returns an "
            "ml_collections.ConfigDict (see configs/gpt_tiny.py)."
        )
    frames = traceback.extract_tb(e.__traceback__)
    if any(os.path.realpath(f.filename) == real for f in frames):
        return f"--config={path}: get_config() raised {_first_line(e)}. Fix the file."
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _disk_error_in(e: BaseException) -> tuple[int, str] | None:
    """A disk error wrapped by Orbax / TensorStore (they re-raise as other types)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and _os_error(e):
            return BAD_INPUT_EXIT, _os_error(e)
        text = str(e)
        for code, what in _DISK.items():  # TensorStore: "... [os_error_code='28']"
            if f"os_error_code='{code}'" in text or errno.errorcode[code] in text:
                return BAD_INPUT_EXIT, _os_error(OSError(code, what))
        e = e.__cause__ or e.__context__
    return None


def _quiet_unraisable(hook):
    """TensorStore completes futures of a failed Orbax read/write after Orbax closed its event
    loop; each prints a "RuntimeError: Event loop is closed" traceback (hundreds after a full
    disk or a damaged checkpoint). The error itself reaches bf16jax as an exception."""

    def quiet(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        hook(unraisable)

    return quiet


def run(argv: list[str] | None = None) -> None:
    """Runs the CLI (`argv` as sys.argv, program name first); exits with the module's codes.

    Errors the user can fix print one line `error: ...` on stderr (no traceback); anything else
    is a bug and keeps its traceback.
    """
    argv = list(sys.argv if argv is None else argv)
    # Called again in one process (tests): forget the last flags, and the override flags that
    # config_flags defined for the last config (even if that parse failed half-way).
    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    saved_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable(sys.unraisablehook)
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - classified below; unknown ones re-raised
        found = _message(e, argv)
        if found is None:
            raise
        code, text = found
        logging.shutdown()
        print(f"error: {text}", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        sys.argv, sys.unraisablehook = saved_argv, saved_hook


if __name__ == "__main__":
    run()
