"""The bad-input table: every case exits 2 with one line `error: ...` naming the problem and the
fix, prints no traceback, and changes nothing already written.

The CLI's entry function (`bf16jax.main.run(argv)`) runs in this process: no case gets as far as
compiling a step, so no subprocess is needed. `python tests/test_bad_input.py` prints the table
(case -> message -> exit code) for docs/guides/faults.md. The other tools' flags (serve, gate)
run as `python -m` subprocesses, all at once (their flags are defined in each tool's `__main__`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runs import REPO, TINY_OVERRIDES

TINY = "configs/gpt_tiny.py"
# The shrunk gpt_tiny of the CLI tests; a resumable workdir is made from it.
SHRUNK = (*TINY_OVERRIDES["gpt_tiny"], "--config.train.steps=4")


@dataclass
class Case:
    name: str
    args: tuple[str, ...]  # after the program name; "{workdir}" / "{cfg}" are filled in
    expect: tuple[str, ...]  # substrings of the error line (the problem, then the fix)
    workdir: str = "fresh"  # fresh | file | resumable | junk | damaged | damaged-manifest
    # | bad-config-json | proc
    config_file: str | None = None  # a config file written for the case


CASES = [
    # --- the command line
    Case("no --config", ("--workdir={workdir}",), ("--config is required", "--config=configs/")),
    Case("no --workdir", (f"--config={TINY}",), ("--workdir must have a value", "--help")),
    Case("misspelt flag", (f"--config={TINY}", "--wrkdir={workdir}"), ("'wrkdir'", "workdir")),
    Case(
        "stray argument",
        (f"--config={TINY}", "--workdir={workdir}", "now"),
        ("unexpected arguments now", "pass flags only"),
    ),
    Case(
        "missing config file",
        ("--config=configs/nope.py", "--workdir={workdir}"),
        ("configs/nope.py: no such file", "configs/*.py"),
    ),
    Case(
        "config syntax error",
        ("--config={cfg}", "--workdir={workdir}"),
        ("syntax error at line 1", "Fix the file"),
        config_file="def get_config(:\n",
    ),
    Case(
        "config without get_config",
        ("--config={cfg}", "--workdir={workdir}"),
        ("defines no get_config()", "ConfigDict"),
        config_file="X = 1\n",
    ),
    Case(
        "get_config raises",
        ("--config={cfg}", "--workdir={workdir}"),
        ("get_config() raised RuntimeError: boom", "Fix the file"),
        config_file="def get_config():\n    raise RuntimeError('boom')\n",
    ),
    Case(
        "get_config returns a dict",
        ("--config={cfg}", "--workdir={workdir}"),
        ("returned a dict", "ml_collections.ConfigDict"),
        config_file="def get_config():\n    return {'a': 1}\n",
    ),
    Case(
        "config imports a missing module",
        ("--config={cfg}", "--workdir={workdir}"),
        ("No module named 'nonexistent_mod'", "imports"),
        config_file="import nonexistent_mod\n\ndef get_config():\n    pass\n",
    ),
    # --- overrides
    Case(
        "unknown key",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.stepz=3"),
        ("unknown config key config.train.stepz", "did you mean 'steps'"),
    ),
    Case(
        "unknown key among many",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.optim.lrate=1"),
        ("unknown config key config.optim.lrate:", "--config_help"),
    ),
    Case(
        "int key given text",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.steps=abc"),
        ("--config.train.steps=abc", "invalid literal"),
    ),
    Case(
        "float key given text",
        (f"--config={TINY}", "--workdir={workdir}", "--config.optim.learning_rate=fast"),
        ("learning_rate=fast", "float"),
    ),
    # --- values
    Case(
        "unknown policy",
        (f"--config={TINY}", "--workdir={workdir}", "--config.precision=bf61"),
        ("config.precision", "'bf61'", "use a preset"),
    ),
    Case(
        "unknown model",
        (f"--config={TINY}", "--workdir={workdir}", "--config.model.name=rnn"),
        ("config.model.name='rnn'", "use one of"),
    ),
    Case(
        "unknown optimizer",
        (f"--config={TINY}", "--workdir={workdir}", "--config.optim.name=lion"),
        ("config.optim.name='lion'", "'adamw'"),
    ),
    Case(
        "unknown loss scale",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.loss_scale=auto"),
        ("train.loss_scale='auto'", "'dynamic'"),
    ),
    Case(
        "unknown moment dtype",
        (f"--config={TINY}", "--workdir={workdir}", "--config.optim.mu_dtype=f7"),
        ("config.optim.mu_dtype", "'f7'"),
    ),
    Case(
        "zero steps",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.steps=0"),
        ("config.train.steps=0", ">= 1"),
    ),
    Case(
        "no preemption check",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.preemption_check_every=0"),
        ("preemption_check_every=0", "1 = check every step"),
    ),
    Case(
        "NaN learning rate",
        (f"--config={TINY}", "--workdir={workdir}", "--config.optim.learning_rate=nan"),
        ("learning_rate=nan", "finite number"),
    ),
    Case(
        "accumulation does not divide the batch",
        (f"--config={TINY}", "--workdir={workdir}", "--config.train.grad_accum_steps=3"),
        ("batch_size=32 is not divisible", "change one"),
    ),
    Case(
        "max_to_keep 0",
        (f"--config={TINY}", "--workdir={workdir}", "--config.checkpoint.max_to_keep=0"),
        ("max_to_keep=0", ">= 1"),
    ),
    Case(
        "allow_config_change names no key",
        (
            f"--config={TINY}",
            "--workdir={workdir}",
            "--config.checkpoint.allow_config_change=optim.mu",
        ),
        ("'optim.mu', not a config key", "precision,optim.mu_dtype"),
    ),
    Case(
        "sequence longer than positions",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.seq_len=512"),
        ("seq_len=512 is longer than", "raise model.max_len"),
    ),
    Case(
        "mesh does not match devices",
        (f"--config={TINY}", "--workdir={workdir}", "--config.mesh.data=3"),
        ("multiply to 3", "8 devices"),
    ),
    # --- data against model and mesh, at start-up
    Case(
        "vocabulary too small for the data",
        (f"--config={TINY}", "--workdir={workdir}", "--config.model.vocab_size=100"),
        ("vocab_size=100 is too small", "vocab_size >= "),
    ),
    Case(
        "tokenizer ids beyond the vocabulary",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.tokenizer=tests/golden/gpt2"),
        ("vocab_size=384 is too small for data.tokenizer=tests/golden/gpt2", "reach 399"),
    ),
    Case(
        "train batch not divisible by the mesh",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.batch_size=12"),
        ("batch_size=12 is not divisible by data*fsdp", "multiple of 8"),
    ),
    Case(
        "eval batch not divisible by the mesh",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.eval_batch_size=12"),
        ("eval_batch_size=12 is not divisible", "multiple of 8"),
    ),
    Case(
        "eval batch larger than the eval split",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.eval_batch_size=1048576"),
        ("eval split", "lower config.data.eval_batch_size"),
    ),
    Case(
        "unknown dataset",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.name=imagenet"),
        ("data.name='imagenet'", "use one of"),
    ),
    Case(
        "images of another size",
        ("--config=configs/vit_digits.py", "--workdir={workdir}", "--config.model.image_size=16"),
        ("(8, 8, 1)", "model.image_size=8"),
    ),
    # --- the workdir
    Case(
        "workdir is a file",
        (f"--config={TINY}", "--workdir={workdir}"),
        ("is a file", "pass a directory"),
        workdir="file",
    ),
    Case(
        "workdir cannot be written",
        (f"--config={TINY}", "--workdir=/proc/bf16jax_run"),
        ("cannot be written", "writable directory"),
        workdir="none",
    ),
    Case(
        "checkpoint dir holds other files",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK),
        ("not checkpoint steps: notes.txt", "nothing was changed"),
        workdir="junk",
    ),
    Case(
        "checkpoint of another model",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.model.embed_dim=64"),
        (
            "changes the meaning of its checkpoint: model.embed_dim 32 -> 64",
            "allow_config_change=model.embed_dim",
        ),
        workdir="resumable",
    ),
    Case(
        "resume under another policy",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.precision=bf16-pure"),
        ('precision "bf16" -> "bf16-pure"', "--config.checkpoint.allow_config_change=precision"),
        workdir="resumable",
    ),
    Case(
        "resume with fp16 loss scaling",
        (
            f"--config={TINY}",
            "--workdir={workdir}",
            *SHRUNK,
            "--config.precision=fp16",
            "--config.train.loss_scale=dynamic",
        ),
        ('train.loss_scale "none" -> "dynamic"', "a new --workdir"),
        workdir="resumable",
    ),
    Case(
        "resume with other optimizer dtypes",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.optim.nu_dtype=bf16"),
        ('optim.nu_dtype "f32" -> "bf16"', "allow_config_change=optim.nu_dtype"),
        workdir="resumable",
    ),
    Case(
        "resume with another data pipeline",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.data.seed=1"),
        ("data.seed 0 -> 1", "config.json"),
        workdir="resumable",
    ),
    Case(
        "steps below the restored step",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK, "--config.train.steps=1"),
        ("steps=1 is below step 2", "--config.train.steps=2 or more"),
        workdir="resumable",
    ),
    Case(
        "every checkpoint damaged",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK),
        ("No checkpoint in", "verifies", "use a new --workdir"),
        workdir="damaged",
    ),
    Case(
        "checksum manifest lacks a field",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK),
        ("No checkpoint in", "checksum manifest: leaf", "use a new --workdir"),
        workdir="damaged-manifest",
    ),
    Case(
        "empty workdir",
        (f"--config={TINY}", "--workdir="),
        ("--workdir is empty", "pass a directory"),
    ),
    Case(
        "workdir name not UTF-8",
        (f"--config={TINY}", "--workdir={workdir}/run\udcff"),
        ("is not valid UTF-8", "rename"),
    ),
    Case(
        "zero sequence length",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.seq_len=0"),
        ("config.data.seq_len=0", ">= 1"),
    ),
    Case(
        "tokenizer path missing",
        (f"--config={TINY}", "--workdir={workdir}", "--config.data.tokenizer=/nonexistent"),
        ("config.data.tokenizer=/nonexistent", "does not exist"),
    ),
    Case(
        "init_from path missing",
        (f"--config={TINY}", "--workdir={workdir}", "--config.init_from=/nonexistent"),
        ("config.init_from=/nonexistent", "does not exist", "bf16jax.convert import"),
    ),
    Case(
        "config record unreadable",
        (f"--config={TINY}", "--workdir={workdir}", *SHRUNK),
        ("config.json cannot be read", "delete it"),
        workdir="bad-config-json",
    ),
    # --- prepared data ({data}: made by make_prepared)
    *(
        Case(
            f"prepared dataset {name}",
            (
                f"--config={TINY}",
                "--workdir={workdir}",
                "--config.data.name=prepared",
                f"--config.data.path={{data}}/{path}",
                *extra,
            ),
            expect,
        )
        for name, path, extra, expect in (
            ("missing", "nothing", (), ("does not exist", "python -m bf16jax.prepare")),
            ("half-written", "half", (), ("holds no part-*-of-*.json manifest", "(re)run it")),
            ("of an unknown version", "v99", (), ("version 99", "prepare the corpus again")),
            ("with an empty eval split", "noeval", (), ("empty eval split", "--eval_fraction")),
            (
                "vocabulary above the embedding",
                "ok",
                ("--config.model.vocab_size=64",),
                ("model.vocab_size=64 is smaller than the vocabulary", "vocab_size >="),
            ),
            (
                "with another tokenizer",
                "ok",
                ("--config.data.tokenizer={data}/bpe",),
                ("differs from the model's", "prepare it again with --tokenizer="),
            ),
        )
    ),  # fmt: skip
]


# ----------------------------------------------------------------------------- workdirs
def make_resumable(root: Path) -> Path:
    """A workdir of the shrunk config holding a committed checkpoint of step 2 and config.json
    (the initial state saved as step 2: nothing is compiled but the init and the checksums)."""
    from bf16jax.checkpoint.manager import Checkpointer
    from bf16jax.config import load_config
    from bf16jax.data import datasets as data_lib
    from bf16jax.training import workdir as workdir_lib
    from bf16jax.training.trainer import create_trainer

    workdir = root / "resumable"
    config = load_config(str(REPO / TINY), [a.removeprefix("--config.") for a in SHRUNK])
    trainer = create_trainer(config)
    state = trainer.init_state()
    state = state.replace(step=state.step + 2)
    it = iter(data_lib.make_dataset(config.data, "train"))
    next(it), next(it)
    with Checkpointer.from_config(config.checkpoint, workdir / "checkpoints") as ckpt:
        ckpt.save(2, state, it.get_state(), force=True)
    workdir_lib.write_config(config, str(workdir))
    make_prepared(root / "prepared")
    return workdir


def make_prepared(root: Path) -> None:
    """Prepared datasets for the cases: ok, noeval, half (shards without a manifest), v99 (a
    manifest of another format version, its checksum valid), and a BPE tokenizer (bpe/)."""
    import json

    import tokenizers
    from prepared_corpus import make_docs, run, write_jsonl

    root.mkdir(parents=True)
    write_jsonl(root / "a.jsonl", make_docs(40))
    run([root / "a.jsonl"], root / "ok", eval_docs=4)
    run([root / "a.jsonl"], root / "noeval")
    shutil.copytree(root / "ok", root / "half")
    for p in (root / "half").glob("part-*"):
        p.unlink()
    shutil.copytree(root / "ok", root / "v99")
    (manifest,) = (root / "v99").glob("part-*.json")
    data = json.dumps(dict(json.loads(manifest.read_text()), version=99)).encode()
    manifest.write_bytes(data)
    Path(f"{manifest}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(make_docs(100), vocab_size=280, special_tokens=["<|endoftext|>"])
    (root / "bpe").mkdir()
    tok.save(str(root / "bpe" / "tokenizer.json"))


def prepare(case: Case, root: Path, resumable: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    workdir = root / case.name.replace(" ", "_")
    if case.workdir == "file":
        workdir.write_text("keep me")
    elif case.workdir in ("resumable", "damaged", "damaged-manifest", "bad-config-json"):
        shutil.copytree(resumable, workdir)
        if case.workdir == "damaged":
            for path in (workdir / "checkpoints" / "2" / "state").rglob("d/*"):
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
        if case.workdir == "damaged-manifest":  # still JSON: '"dtype"' -> '"dthpe"'
            meta = workdir / "checkpoints" / "2" / "manifest" / "metadata"
            meta.write_text(meta.read_text().replace('"dtype"', '"dthpe"', 1))
        if case.workdir == "bad-config-json":
            (workdir / "config.json").write_text("{not json")
    elif case.workdir == "junk":
        (workdir / "checkpoints").mkdir(parents=True)
        (workdir / "checkpoints" / "notes.txt").write_text("keep me")
    return workdir


def snapshot(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(path.rglob("*"))
    }


def run_case(
    case: Case, root: Path, resumable: Path, capture: bool = True
) -> tuple[int | None, str, Path]:
    """Runs the CLI in this process; returns (exit code, stderr if `capture`, workdir)."""
    from absl import logging as absl_logging

    from bf16jax import main

    workdir = prepare(case, root, resumable)
    cfg = root / f"{case.name.replace(' ', '_')}_config.py"
    if case.config_file is not None:
        cfg.write_text(case.config_file)
    data = resumable.parent / "prepared"
    argv = ["bf16jax.main", *(a.format(workdir=workdir, cfg=cfg, data=data) for a in case.args)]
    # absl's log handler keeps the stream it was created with: give it the current one.
    absl_logging.get_absl_handler().python_handler.stream = sys.stderr
    # ml_collections loads every --config file as module "config_config", into the module
    # object of the last load if there is one: a file without get_config() would inherit it.
    sys.modules.pop("config_config", None)
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err) if capture else contextlib.nullcontext():
        try:
            main.run(argv)
        except SystemExit as e:
            code = e.code
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return code, err.getvalue(), workdir


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    return make_resumable(tmp_path_factory.mktemp("bad_input"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line(case, resumable, tmp_path, capfd, monkeypatch):
    from bf16jax.training import loop

    # Every case must be refused at start-up: training would be a failure (and slow).
    monkeypatch.setattr(loop, "_train", lambda *a: pytest.fail("start-up accepted it"))
    before_dir = prepare(case, tmp_path / "before", resumable) if case.workdir != "fresh" else None
    before = snapshot(before_dir) if before_dir is not None and before_dir.exists() else None
    code, _, workdir = run_case(case, tmp_path, resumable, capture=False)
    _, err = capfd.readouterr()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    for text in case.expect:
        assert text in line, line
    if case.workdir == "fresh":
        assert not workdir.exists()  # nothing is created before the input is known good
    elif before is not None:
        assert snapshot(workdir) == before  # nothing already written changed


# ----------------------------------------------------------------------------- the other tools
def _tool_cases(tmp_path, busy_port):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    missing = tmp_path / "missing.json"
    return {
        "serve port -1": (
            ("bf16jax.serve", "--artifact=/nonexistent", "--port=-1"),
            ("--port=-1 is not a TCP port", "1-65535"),
        ),
        "serve port in use": (
            ("bf16jax.serve", "--artifact=/nonexistent", f"--port={busy_port}"),
            (f"--port={busy_port}: the address is already in use", "another --port"),
        ),
        "gate thresholds not JSON": (
            ("bf16jax.gate", "--candidate=/nonexistent", f"--thresholds={bad}"),
            (f"--thresholds={bad} cannot be read", "Expecting property name", "a JSON file"),
        ),
        "gate thresholds missing": (
            ("bf16jax.gate", "--candidate=/nonexistent", f"--thresholds={missing}"),
            (f"--thresholds={missing} cannot be read (No such file", "a JSON file"),
        ),
    }


def test_tools_refuse_bad_flags_with_one_line(tmp_path):
    """serve / gate flags that cannot work exit 2 with one line, before any model loads (the
    artifacts named do not exist: the flag is refused first)."""
    import socket
    import subprocess

    from cli_runs import cli_env

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = _tool_cases(tmp_path, busy.getsockname()[1])
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=REPO,
                env=cli_env(devices=1),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, (args, _) in cases.items()
        }
        done = {name: p.communicate(timeout=120) for name, p in procs.items()}
    for name, (_, expect) in cases.items():
        code, err = procs[name].returncode, done[name][1]
        assert code == 2 and "Traceback" not in err, (name, err[-2000:])
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, (name, err[-2000:])
        for text in expect:
            assert text in errors[0], (name, errors[0])


def test_a_key_error_elsewhere_is_not_called_an_unknown_config_key():
    """Only ml_collections' override parsing makes a KeyError an unknown key; before, any
    KeyError with an override on the command line was reported as one (a damaged manifest's
    'dtype' read as 'unknown config key config.model.num_layers')."""
    from bf16jax import cli

    argv = ["bf16jax.main", f"--config={TINY}", "--workdir=x", "--config.model.num_layers=1"]
    try:
        {"dthpe": "float32"}["dtype"]
    except KeyError as e:
        assert cli._message(e, argv) is None  # a bug: its traceback is kept


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


if __name__ == "__main__":  # the table in docs/guides/faults.md
    import os
    import tempfile

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    root = Path(tempfile.mkdtemp(prefix="bf16jax_bad_input_"))
    res = make_resumable(root / "src")
    print("| case | message (stderr, one line) | exit |\n| --- | --- | --- |")
    for c in CASES:
        code, err, _ = run_case(c, root, res)
        line = next((ln for ln in err.splitlines() if ln.startswith("error: ")), err[-200:])
        line = line.replace(str(root), "…").replace("|", "\\|")
        print(f"| {c.name} | `{line}` | {code} |")
        sys.stdout.flush()
