"""A run fine-tuned from a converted checkpoint (config.init_from, data.tokenizer=init_from):
export, generate and evaluate resolve it as bf16jax.main did (from --workdir alone, or from the
run's own flags), and the end-of-training sample speaks the run's tokenizer.

The run is the golden GPT-2 (2 layers, width 32, a 400-id BPE tokenizer) started as
`bf16jax.main` starts it (`loop.start_run`), its state saved as step 1: no train step compiles.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_runs import REPO, cli_env

from bf16jax import cli
from bf16jax.config import load_config
from bf16jax.data.tokenizer import load_tokenizer
from bf16jax.interop import convert
from bf16jax.training import loop

GOLDEN = REPO / "tests" / "golden" / "gpt2"
SHRUNK = ("data.seq_len=32", "data.batch_size=8", "data.eval_batch_size=8", "train.steps=2")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    converted = root / "gpt2"
    convert.import_hf(str(GOLDEN), str(converted), precision="fp32")
    overrides = [f"init_from={converted}", "data.tokenizer=init_from", *SHRUNK]
    config = load_config(str(REPO / "configs" / "gpt_tiny.py"), overrides)
    workdir = root / "run"
    run = loop.start_run(config, str(workdir))  # what bf16jax.main does before its first step
    try:
        run.ckpt.save(1, run.state, run.train_it, force=True)
    finally:
        run.close()
    return converted, overrides, workdir, run


def test_a_run_resolves_as_main_resolved_it(finetuned):
    converted, overrides, workdir, run = finetuned
    assert run.config.model.embed_dim == 32 and run.config.data.tokenizer == str(converted)
    flags_config = load_config(str(REPO / "configs" / "gpt_tiny.py"), overrides)
    assert flags_config.model.embed_dim != 32  # gpt_tiny's own, before resolution
    assert cli.resolve_run(flags_config, str(workdir)).to_dict() == run.config.to_dict()
    assert cli.resolve_run(None, str(workdir)).to_dict() == run.config.to_dict()


def test_tools_on_an_init_from_run(finetuned, tmp_path):
    """generate and evaluate with --workdir alone, export with the run's own flags: all three
    restore the fine-tuned run (before, each failed on missing / misshapen leaves)."""
    converted, overrides, workdir, _ = finetuned
    flags = [f"--config={REPO}/configs/gpt_tiny.py", *(f"--config.{o}" for o in overrides)]
    commands = {
        "generate": ["--prompt=And the", "--max_tokens=4"],
        "evaluate": ["--num_batches=1", "--reference=none"],
        "export": [
            *flags,
            f"--out={tmp_path}/art",
            "--precision=fp32",
            "--platforms=cpu",
            "--eval_batches=0",
        ],  # fmt: skip
    }
    procs = {
        tool: subprocess.Popen(
            [sys.executable, "-m", f"bf16jax.{tool}", f"--workdir={workdir}", *args],
            cwd=REPO,
            env=cli_env(devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tool, args in commands.items()
    }
    out = {tool: p.communicate(timeout=300) for tool, p in procs.items()}
    for tool, p in procs.items():
        assert p.returncode == 0, (tool, out[tool][1][-3000:])
    row = json.loads(out["generate"][0].splitlines()[-1])
    tokenizer = load_tokenizer(str(converted))
    assert row["text"] == tokenizer.decode(row["tokens"])
    assert json.loads(out["evaluate"][0])["model"]["source"]["step"] == 1
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["config"]["model"]["embed_dim"] == 32


def test_the_sample_uses_the_run_tokenizer(finetuned):
    converted, _, _, run = finetuned
    text = loop.sample_text(run.trainer, run.state, 16)
    tokenizer = load_tokenizer(str(converted))
    assert text.startswith("And ")
    # The byte tokenizer decodes 100 of the 400 BPE ids as T5 sentinels.
    assert "<extra_id_" not in text
    assert tokenizer.decode(tokenizer.encode("And ")) == "And "
