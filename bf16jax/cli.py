"""Shared parts of bf16jax's command-line tools (export, generate, evaluate, gate, registry,
serve): the flags that name a training run or an artifact, quiet logging, and the runner that
turns bad input into one line on stderr and exit code 2 (`run`, also behind `bf16jax.main`).

Flags are defined by each tool's `__main__` block, never at import, so the library modules can
be imported together without absl flag clashes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
import traceback

from absl import app, flags

__all__ = [
    "BAD_INPUT_EXIT",
    "DIVERGED_EXIT",
    "INTERRUPTED_EXIT",
    "BadInput",
    "define_source_flags",
    "define_config_help_flag",
    "config_override_args",
    "split_config_overrides",
    "script_parser",
    "define_eval_flags",
    "define_data_flag",
    "write_report",
    "run_from_flags",
    "resolve_run",
    "config_source",
    "quiet_logs",
    "run",
]


BAD_INPUT_EXIT = 2
DIVERGED_EXIT = 3
INTERRUPTED_EXIT = 130


class BadInput(Exception):
    """One line for the user; exit 2."""


def define_source_flags(*, artifact: bool = True) -> None:
    """--config / --workdir / --step name a training run; --artifact an exported directory."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "The run's configs/*.py (with its --config.x overrides); default: WORKDIR/config.json, "
        "the resolved config the run wrote.",
        lock_config=True,
    )
    define_config_help_flag()
    flags.DEFINE_string("workdir", None, "The training run's --workdir (its checkpoints).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    if artifact:
        flags.DEFINE_string("artifact", None, "An artifact directory (bf16jax.serving.export).")


def define_config_help_flag() -> None:
    """--config_help: print every key of --config as an override line and exit (see `run`)."""
    from absl import flags

    flags.DEFINE_bool(
        "config_help",
        False,
        "Print every key of --config (after the --config.KEY=VALUE overrides) as an override "
        "line with its type and value, and exit.",
    )


def define_eval_flags() -> None:
    """--num_batches / --seed of the held-out evaluation and --out for the JSON report."""
    from absl import flags

    flags.DEFINE_integer("num_batches", None, "Eval batches (default config.train.eval_steps).")
    flags.DEFINE_integer("seed", 0, "Seed of the shifted inputs.")
    flags.DEFINE_string("out", None, "Also write the JSON report to this file.")


def define_data_flag() -> None:
    """--data: measure on this prepared dataset instead of the model's own training data."""
    from absl import flags

    flags.DEFINE_string(
        "data", None,
        "A prepared dataset directory (python -m bf16jax.prepare) to measure on instead of the "
        "model's own training data (recorded in WORKDIR/config.json / the artifact); the report "
        "says which data it measured.",
    )  # fmt: skip


def write_report(text: str) -> None:
    """Prints `text` and writes it to --out when given."""
    from absl import flags

    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text)


def run_from_flags():
    """(config, workdir) of the training run that --workdir (with --config) names, resolved as
    `bf16jax.main` resolved it (`resolve_run`); ValueError naming what is missing."""
    from absl import flags

    f = flags.FLAGS
    if not f.workdir:
        what = "--artifact=DIR, or " if "artifact" in f else ""
        raise ValueError(
            f"Name a model: {what}--workdir=DIR of a training run (its config.json is read; or "
            "--config=configs/NAME.py with the run's overrides too)."
        )
    return resolve_run(f.config, f.workdir), f.workdir


def resolve_run(config, workdir: str):
    """The config a training run in `workdir` ran under, resolved as `bf16jax.main` resolves it.

    With `config` (the --config flag and its overrides): `config.init_from`'s architecture and
    `data.tokenizer='init_from'` are resolved (`bf16jax.interop.convert.resolve_init_from`), as
    the training loop does. Without: WORKDIR/config.json, the resolved config the run wrote when
    it started, so `--workdir` alone names the run.

    Raises:
      ValueError: no config given and no readable config.json in `workdir`.
    """
    if config is not None:
        from bf16jax.interop import convert

        return convert.resolve_init_from(config)
    from bf16jax.training import workdir as workdir_lib

    return workdir_lib.read_config(workdir)


def config_source(workdir: str) -> str:
    """The file the run's config came from: --config's, else WORKDIR/config.json."""
    from absl import flags

    if flags.FLAGS.config is not None:
        return os.path.abspath(flags.FLAGS["config"].config_filename)
    from bf16jax.training import workdir as workdir_lib

    return os.path.abspath(os.path.join(workdir, workdir_lib.CONFIG_FILE))


def quiet_logs() -> None:
    """Orbax / absl at WARNING, bf16jax's own lines at INFO."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("bf16jax").setLevel(logging.INFO)


def config_override_args(argv: list[str] | None = None, flag_values=None) -> list[str]:
    """The `--config.KEY=VALUE` overrides of a parsed command line, one token each, in order.

    For scripts that launch `bf16jax.main` runs with the user's overrides (the studies): the
    forms absl accepts (`--config.k=v`, `--config.k v`, `-config.k=v`, `--[no]config.flag` for a
    bool) come back as tokens the child parses to the same values. Call after flag parsing.

    Args:
      argv: the command line, program name first (default `sys.argv`).
      flag_values: where the `--config` flags are defined (default absl's `flags.FLAGS`).
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    argv = list(sys.argv if argv is None else argv)[1:]
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            break
        m = re.match(r"^--?((?:no)?config\.[\w.]+)(=.*)?$", token)
        i += 1
        if m is None:
            continue
        name, value = m.groups()
        if value is None and name in fv and not fv[name].boolean:
            value, i = f"={argv[i]}", i + 1  # `--config.k v`
        out.append(f"--{name}{value or ''}")
    return out


def split_config_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(other arguments, overrides as KEY=VALUE) of a script that runs several configs.

    The experiment scripts that train or compile more than one config (`benchmark.py`,
    `precision_study.py`, `step_audit.py`) take `bf16jax.main`'s override syntax and apply it
    to every config through `bf16jax.config.load_config` (ml_collections' `config_flags`, so
    values parse by the type they replace). Accepted as absl accepts them: `--config.k=v`,
    `-config.k=v`, `--config.k v`, `--config.flag` (true) and `--noconfig.flag` (false).
    """
    rest, overrides, i = [], [], 0
    while i < len(args):
        token = args[i]
        i += 1
        m = re.match(r"^--?(no)?config\.([\w.]+)(?:=(.*))?$", token, re.S)
        if m is None:
            rest.append(token)
            continue
        negated, key, value = m.groups()
        if negated:
            value = "false"
        elif value is None:
            if i < len(args) and not args[i].startswith("-"):
                value, i = args[i], i + 1  # `--config.k v`
            else:
                value = "true"  # `--config.flag`
        overrides.append(f"{key}={value}")
    return rest, overrides


def script_parser(doc: str, applies_to: str = "every config the script runs"):
    """The argparse parser of an experiment script that takes `--config.KEY=VALUE` overrides
    (read by `split_config_overrides` before argparse sees the rest): `--help` shows every
    flag's default and says how overrides apply; no abbreviated flags (`--config.x` must never
    match another flag)."""
    import argparse

    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
        epilog=f"--config.KEY=VALUE (repeatable) overrides {applies_to}, as on bf16jax.main "
        "(ml_collections config_flags).",
    )


def _overrides(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--config.")]


def _from_override(error: BaseException) -> bool:
    """Whether `error` was raised while ml_collections applied the --config.KEY=VALUE
    overrides (its config_flags module is on the traceback): only then is an AttributeError or
    KeyError an unknown key. Anywhere else it is a bug or damage, and says so itself."""
    where = os.sep + os.path.join("ml_collections", "config_flags") + os.sep
    return any(where in f.filename for f in traceback.extract_tb(error.__traceback__))


def _raised_by_bf16jax(error: BaseException) -> bool:
    """Whether bf16jax's own code raised `error` (its last frame is in the package), as the
    FileNotFoundErrors that name a missing input and the fix do; not one from a library call."""
    frames = traceback.extract_tb(error.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(package)


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
        f"unknown config key {which}{hint}: the config is locked. Run with --config_help to "
        "list every key."
    )


_HELP_FLAGS = ("--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-helpshort", "-?")


def _parse_flags(argv: list[str], *, require_config: bool = False) -> list[str]:
    """absl's parser, with its errors (exit 1, "FATAL Flags parsing error") as one line.

    `--help` / `--helpfull` work without --config; with one, absl's flag list is followed by
    every key of that config (`--config_help`'s listing): the override flags absl itself shows
    are only the ones on the command line. `--config_help` prints that listing and exits 0.
    """
    asks_help = any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:])
    has_config = any(re.match(r"^--?config(=|$)", a) for a in argv[1:])
    if require_config and not asks_help and not has_config:
        raise BadInput("--config is required: pass --config=configs/NAME.py (see configs/).")
    path = _config_file(argv)
    if path is not None and not os.path.isfile(path):
        raise BadInput(f"--config={path}: no such file: pass a configs/*.py path.")
    try:
        rest = flags.FLAGS(argv)
    except SystemExit:  # absl printed the help
        if asks_help and path is not None:
            print(f"\nEvery key of {path} (override with --config.KEY=VALUE):")
            print(_config_listing(path, argv))
        raise
    except flags.Error as e:
        text = str(e).splitlines()[0]
        if "--config" in text and "Failed loading config file" in text:
            raise BadInput(f"--config: {text}") from None
        raise BadInput(f"{text.rstrip('.')}. Run with --help for the flags.") from None
    if "config_help" in flags.FLAGS and flags.FLAGS.config_help:
        if path is None:
            raise BadInput("--config_help lists the keys of a config: pass --config=FILE too.")
        print(_config_listing(path, argv))
        sys.exit(0)
    return rest


def _config_listing(path: str, argv: list[str]) -> str:
    from bf16jax.config import config_help, load_config

    return config_help(load_config(path, [a for a in argv if a.startswith("--config.")]))


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
    from bf16jax.checkpoint.manager import CheckpointDamaged

    if isinstance(e, BadInput):
        return BAD_INPUT_EXIT, str(e)
    if _config_error(e, argv):
        return BAD_INPUT_EXIT, _config_error(e, argv)
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED_EXIT, (
            f"interrupted ({e or 'SIGINT'}): a save in flight may not have committed; rerun the "
            "same command to resume from the newest checkpoint that verifies."
        )
    if type(e).__name__ == "TrainingDiverged":
        return DIVERGED_EXIT, str(e)
    if isinstance(e, (AttributeError, KeyError)) and _overrides(argv) and _from_override(e):
        return BAD_INPUT_EXIT, _unknown_key(argv, e)
    if isinstance(e, FileNotFoundError) and e.errno is None and _raised_by_bf16jax(e):
        return BAD_INPUT_EXIT, str(e).replace("\n", " ")  # bf16jax's own: names file and fix
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


def run(main_fn, argv: list[str] | None = None, *, require_config: bool = False) -> None:
    """Runs `main_fn(argv)` under absl (`argv` as sys.argv, program name first); exits with the
    module's codes (`BAD_INPUT_EXIT`, `DIVERGED_EXIT`, `INTERRUPTED_EXIT`).

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
        parse = functools.partial(_parse_flags, require_config=require_config)
        app.run(main_fn, argv=argv, flags_parser=parse)
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
