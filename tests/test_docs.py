"""The docs are true: every command and snippet in README.md, experiments/README.md and docs/ runs.

Each one (tests/doc_snippets.py reads them out) matches exactly one rule below, and every rule
matches something (a rule for a command the docs dropped fails too). A rule runs the command
as written, shrunk where it would take long (tiny model sizes and few steps appended as
`--config.KEY=VALUE` overrides, fewer seeds, a free port), in a scratch copy of the repository's
layout, in document order: README.md, experiments/README.md, then the pages of docs/ in the
order of mkdocs.yml's nav (later commands use what earlier ones made: `make demo`'s run is the
one the serving commands export). A command or snippet that several pages repeat runs once.
`pip install` lines run as `--dry-run --no-index --no-deps` and their extras must exist. What
cannot run here says why: another test that runs it (named, and it must exist), the network, a
TPU, or this suite itself.

The runs share one Python process (tests/doc_driver.py): one JAX import, one compile of each
program, as `make test` on 2 cores allows.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_runs import REPO, TINY_OVERRIDES, cli_env
from doc_snippets import Snippet, snippets

FRONT_DOCS = ("README.md", "experiments/README.md")  # then docs/, in mkdocs.yml's nav order
GOLDEN_T5 = REPO / "tests" / "golden" / "t5_v1_1"  # a tiny FLAN-T5-shaped checkpoint
# The docs' placeholders, filled in; an optional `[...]` part naming one is left out.
PLACEHOLDERS = {
    "PRECISION": "bf16; q=w8a8",
    "NAME": "w8a8",
    "HF_DIR": "tests/golden/gpt2",
    "OUT_DIR": "runs/gpt2_imported",
    "HF_OUT": "runs/gpt2_hf",
    "WORKDIR": "runs/gpt2_imported",  # a converted directory is a checkpoint too
}
# Runs that later commands build on: `make demo`'s run is exported, gated and served, so it
# trains long enough for its BF16 export to agree with the FP32 one.
STEPS_FOR_WORKDIR = {"runs/gpt_tiny_bf16": 150}


@dataclass
class Rule:
    """How the commands matching `pattern` (a regex searched in the command text) are tested.

    kind: "run" (as written, then `shrink`), "pip" (dry run), "python" (a ```python block),
    "covered" (by `test`, which must exist and name `marker`), "skip" (`why`).
    """

    pattern: str
    kind: str
    why: str = ""
    test: str = ""
    marker: str = ""
    codes: tuple[int, ...] = (0,)  # documented exit codes
    extra: tuple[str, ...] = ()  # arguments appended (the shrink)
    steps: int = 4  # train.steps of a shrunk training run
    background: str = ""  # a server: the URL path that must answer
    replace: tuple[tuple[str, str], ...] = ()  # (argument, shrunk argument)
    forbid: str = ""  # text the command's stdout must not hold (errors it reports and exits 0)
    check: str = ""  # text the command's stdout must hold
    matched: list = field(default_factory=list)


FLAN_SHRINK = (
    "--config.data.enc_len=32",
    "--config.data.dec_len=16",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=8",
)
RULES = [
    Rule(r"^make test\b", "skip", "the suite running this test (`make test`, `bash .ci/run`)"),
    Rule(r"^bash \.ci/run", "skip", "`make test` on a fresh clone: the suite running this test"),
    Rule(r"^make setup\b", "skip", "made the venv this suite runs in (CI: .ci/run)"),
    Rule(r"^make aot-tpu-compare\b", "skip", "needs the TPU venv (.venv-tpu: libtpu, jax[tpu])"),
    # docs/guides/own-data.md: prepare and a training run on prepared data run for real in
    # tests/test_prepared_resume.py (the real commands, shrunk); the guide's 60-step runs and the
    # 1 GB benchmark take minutes.
    Rule(
        r"^python -m bf16jax\.prepare",
        "covered",
        test="tests/test_prepared_resume.py",
        marker="bf16jax.prepare",
    ),  # fmt: skip
    Rule(
        r"^python -m bf16jax\.(main|evaluate) --config=configs/(gpt_tiny|t5_small)\.py "
        r"--config\.data\.name=prepared",
        "covered",
        test="tests/test_prepared_resume.py",
        marker="bf16jax.main",
    ),  # fmt: skip
    Rule(
        r"^python experiments/data_bench\.py",
        "skip",
        "a 1 GB corpus: minutes of CPU (tests/test_prepare.py checks the same code paths)",
    ),
    Rule(r"^make aot-tpu", "covered", test="tests/test_aot.py", marker="aot_tpu"),
    Rule(r"^make (demo|lint)\b", "run", "the Makefile recipe, run as written"),
    Rule(r"pip install", "pip", "dry run: the requirement resolves and its extras exist"),
    Rule(r"^\.venv/bin/python -c ", "run"),
    Rule(r"tensorboard --logdir", "run", "as `tensorboard --inspect` (no server)"),
    Rule(r"^hf download", "run", "offline: copies the golden FLAN-T5 stand-in"),
    Rule(
        r"^(\S*python) -m bf16jax\.(main|convert|export|generate)\s*$",
        "run",
        "a mention: importable",
    ),
    Rule(r"bf16jax\.convert (import|export)", "run"),
    Rule(r"bf16jax\.main .*configs/flan_t5_small_ft\.py", "run", extra=FLAN_SHRINK, steps=2),
    Rule(r"bf16jax\.main ", "run"),
    Rule(r"^RUN=|^A=", "run", "a shell variable for the next commands"),
    Rule(
        r"bf16jax\.generate ",
        "run",
        "the shrunk model's positions (32) hold the prompt and 16 new tokens",
        replace=(("--max_tokens=64", "--max_tokens=16"),),
    ),
    Rule(r"bf16jax\.(export|evaluate) ", "run"),
    Rule(
        r"bf16jax\.gate ", "run", "exit 0 (pass) or 1 (a regression), as documented", codes=(0, 1)
    ),
    Rule(r"bf16jax\.registry .* promote", "run", "promotes or refuses (gated)", codes=(0, 1)),
    Rule(r"bf16jax\.registry .* rollback", "run", "nothing earlier to go back to", codes=(0, 2)),
    Rule(r"bf16jax\.registry ", "run"),
    Rule(r"bf16jax\.serve --registry", "run", background="/healthz"),
    Rule(
        r"^BF16JAX_API_KEY=\S+ python -m bf16jax\.serve --artifact",
        "run",
        "in the background with its key; answers /healthz once warm",
        background="/healthz",
    ),
    Rule(
        r"^curl .*localhost:8000/v1/",
        "covered",
        "the server is stopped once it answers: the openai client drives the same routes",
        test="tests/test_serving_api.py",
        marker="/v1/completions",
    ),
    Rule(
        r"experiments/serving_bench\.py",
        "covered",
        test="tests/test_serving_api.py",
        marker="serving_bench",
    ),  # fmt: skip
    Rule(r"^python -m pytest .*tests/test_packing\.py", "skip", "this suite runs it (`make test`)"),
    Rule(r"^\.venv-tpu/bin/python ", "skip", "needs the TPU venv (.venv-tpu: libtpu, jax[tpu])"),
    Rule(r"^python -m bf16jax\.serve$", "run", "a mention: importable"),
    Rule(r"ARTIFACT/loader\.py", "covered", test="tests/test_serving.py", marker="loader.py"),
    Rule(
        r"tests/fault_harness\.py --code",
        "covered",
        test="tests/test_faults.py",
        marker="fault_harness",
    ),  # fmt: skip
    Rule(r"tests/test_bad_input\.py$", "run", "prints the README's table"),
    Rule(
        r"experiments/precision_study\.py",
        "covered",
        test="tests/test_study.py",
        marker="precision_study.py",
    ),  # fmt: skip
    Rule(r"experiments/memory_table\.py", "run"),
    Rule(
        r"experiments/step_audit\.py",
        "run",
        "one config and policy (lowering only)",
        extra=("--configs=gpt_tiny", "--policies=bf16"),
    ),
    Rule(r"experiments/numerics_edges\.py --only=", "run", "as written", forbid='"error: '),
    Rule(
        r"experiments/numerics_edges\.py$",
        "run",
        "every measurement but 1_lsq (176 s of QAT training alone on the 2-core CPU; "
        "tests/test_quant.py trains the log-domain LSQ it measures)",
        extra=(
            "--only=2_decay_mask,3_overrides,4_kahan,5_fp16_rules,6_cross_entropy,"
            "7_grad_subnormal,8_weight_decay,9_residual_gelu_fp8",
        ),
        forbid='"error: ',
        check="9_residual_gelu_fp8 {",
    ),
    Rule(r"shared/tools/gpu_wheels\.sh", "skip", "downloads wheels (network), outside the repo"),
    Rule(
        r"experiments/pure_bf16_study\.py",
        "run",
        "one seed, one policy",
        extra=("--policies=bf16-pure-kahan",),
    ),  # fmt: skip
    Rule(
        r"experiments/serving_gate\.py", "covered", test="tests/test_serving.py", marker="gate"
    ),  # fmt: skip
    Rule(r"experiments/load_test\.py", "covered", test="tests/test_serve.py", marker="load_test"),
    Rule(r"experiments/benchmark\.py", "skip", "benchmark: see tests/test_benchmark.py"),
    Rule(r"mkdocs build", "covered", test="tests/test_docs_site.py", marker="mkdocs"),
    Rule(
        r"mkdocs serve",
        "skip",
        "a live-reload server; tests/test_docs_site.py builds the same site",
    ),
    Rule(
        r"^```python\nimport openai\b",
        "covered",
        "needs the served artifact; the test runs this client against the same routes",
        test="tests/test_serving_api.py",
        marker="openai.AsyncOpenAI",
    ),
    Rule(r"^```python", "python"),
]


def _code(text: str) -> str:
    """A command without its trailing `# comment`."""
    return re.sub(r"\s+#\s.*$", "", text)


def _rule_for(snippet: Snippet) -> Rule:
    text = f"```python\n{snippet.text}" if snippet.kind == "python" else _code(snippet.text)
    hits = [r for r in RULES if re.search(r.pattern, text)]
    assert hits, f"{snippet.where}: no rule for {text!r}: add one to tests/test_docs.py"
    return hits[0]


def doc_files(root: Path = REPO) -> list[Path]:
    """README.md, experiments/README.md, then every page of docs/: those in mkdocs.yml's nav in
    nav order (the reading order), any other page after them."""
    nav = re.findall(
        r"^\s*-\s*(?:[^:\n]+:\s*)?([\w/.-]+\.md)\s*$", (root / "mkdocs.yml").read_text(), re.M
    )
    pages = [root / "docs" / page for page in nav]
    pages += sorted(p for p in (root / "docs").rglob("*.md") if p not in pages)
    return [root / doc for doc in FRONT_DOCS] + pages


def all_snippets() -> list[Snippet]:
    return [s for doc in doc_files() for s in snippets(doc, REPO)]


def test_every_command_and_snippet_has_a_rule_and_every_rule_is_used():
    found = all_snippets()
    assert len(found) > 40  # the reader reads the docs
    for rule in RULES:
        rule.matched.clear()
    for snippet in found:
        _rule_for(snippet).matched.append(snippet.where)
    unused = [r.pattern for r in RULES if not r.matched]
    assert not unused, f"rules that match no command in the docs: {unused}"
    for rule in RULES:
        if rule.kind == "covered":
            source = (REPO / rule.test).read_text()
            assert rule.marker in source, (rule.test, rule.marker)
        if rule.kind == "skip":
            assert rule.why


# ----------------------------------------------------------------------------- pip lines
def _pip_requirements(text: str) -> list[list[str]]:
    """The `pip install` parts of a command line, split by the shell."""
    out = []
    for part in text.split("&&"):
        words = _shell_words(part)
        if "pip" in " ".join(words[:2]) and "install" in words:
            out.append(words[words.index("install") + 1 :])
    return out


def test_install_lines_resolve_offline():
    lines = [s for s in all_snippets() if s.kind == "shell" and "pip install" in _code(s.text)]
    assert len(lines) >= 5
    own = importlib.metadata.metadata("bf16jax").get_all("Provides-Extra")
    for snippet in lines:
        for args in _pip_requirements(snippet.text):
            reqs = _requirements(args)
            for req in reqs:
                name, extras = re.match(r"([^\[<>=]+)(?:\[([^\]]*)\])?", req).groups()
                wanted = [e.strip() for e in (extras or "").split(",") if e.strip()]
                have = own if name in (".", "bf16jax") else _extras_of(name)
                missing = [e for e in wanted if e not in have]
                assert not missing, f"{snippet.where}: {name} has no extra {missing}"
            pkgs = [r for r in reqs if not r.startswith(".")]
            pkgs = [r for r in pkgs if _installed(re.match(r"[\w.-]+", r).group(0))]
            if not pkgs:  # only this project, or packages this venv lacks (torch: the network)
                continue
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--dry-run",
                    "--no-index",
                    "--no-deps",
                    *pkgs,
                ],  # fmt: skip
                capture_output=True,
                text=True,
                env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
            )
            assert proc.returncode == 0, f"{snippet.where}: {proc.stderr[-2000:]}"


def _requirements(args: list[str]) -> list[str]:
    """The requirements of `pip install ARGS`, options (and an index URL) dropped."""
    out, skip = [], False
    for a in args:
        if skip or a.startswith("-"):
            skip = a in ("--index-url", "-i", "--extra-index-url")
            continue
        out.append(a)
    return out


def _extras_of(name: str) -> list[str]:
    if not _installed(name):
        return []
    return importlib.metadata.metadata(name).get_all("Provides-Extra") or []


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _shell_words(text: str, env: dict[str, str] | None = None) -> list[str]:
    """`text` split and expanded by bash (quotes, $VAR, $'\\n'), comments dropped."""
    script = "".join(f"{k}={_quote(v)}\n" for k, v in (env or {}).items())
    script += f"printf '%s\\0' {text}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return [w for w in proc.stdout.split("\0") if w]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------------- the runs
def _sandbox(root: Path) -> None:
    """The repository's layout, read-only parts linked, where the commands write."""
    for name in ("configs", "tests", "bf16jax", "Makefile", "pyproject.toml", "colab"):
        (root / name).symlink_to(REPO / name)
    (root / "experiments").mkdir()
    for item in (REPO / "experiments").iterdir():
        if item.name not in ("results", "__pycache__"):
            (root / "experiments" / item.name).symlink_to(item)
    (root / "experiments" / "results").mkdir()
    venv = Path(sys.executable).parent.parent
    if (venv / "pyvenv.cfg").is_file():  # .venv/bin/python must find its pyvenv.cfg (site-packages)
        (root / ".venv").symlink_to(venv)
        return
    (root / ".venv" / "bin").mkdir(parents=True)  # no venv: the tools of this interpreter
    for tool in ("python", "python3", "tensorboard", "pip", "ruff"):
        real = shutil.which(tool, path=str(Path(sys.executable).parent)) or sys.executable
        (root / ".venv" / "bin" / tool).symlink_to(real)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _shrink(argv: list[str], rule: Rule) -> list[str]:
    """Appends the tiny sizes and few steps to a command that names configs/NAME.py."""
    config = next((a for a in argv if a.startswith("--config=configs/")), None)
    if config is None:
        return argv + list(rule.extra)
    name = Path(config.split("=", 1)[1]).stem
    tiny = TINY_OVERRIDES.get(name, ())
    workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), "")
    steps = STEPS_FOR_WORKDIR.get(workdir, rule.steps)
    common = (
        f"--config.train.steps={steps}",
        "--config.train.log_every=1" if steps < 10 else f"--config.train.log_every={steps}",
        f"--config.train.eval_every={steps}",
        "--config.train.eval_steps=1",
        f"--config.checkpoint.every_steps={steps}",
    )
    if any(a.startswith("--config.train.sample_tokens=") and a.endswith("=0") for a in argv):
        common += ("--config.train.sample_tokens=0",)
    elif "bf16jax.main" in argv:
        common += ("--config.train.sample_tokens=8",)
    return [*argv, *tiny, *common, *rule.extra]


def _plan(found: list[Snippet], root: Path) -> list[dict]:
    """The steps tests/doc_driver.py runs for the "run" / "python" rules, in document order."""
    env: dict[str, str] = {}
    plan, seen = [], set()
    for snippet in found:
        rule = _rule_for(snippet)
        if rule.kind == "python":
            if snippet.text not in seen:  # the README's example, repeated in a guide: one run
                seen.add(snippet.text)
                plan.append({"where": snippet.where, "argv": ["python", "-c", snippet.text]})
            continue
        if rule.kind != "run":
            continue
        text = _fill_placeholders(snippet.text)
        if m := re.match(r"^([A-Z]\w*)=(\S+|\"[^\"]*\")\s*(#.*)?$", text):
            env[m.group(1)] = _shell_words(m.group(2))[0]
            continue
        argv = _shell_words(text, env)
        prefix = {}  # `NAME=value command`: the command's own environment
        while argv and re.match(r"^[A-Z]\w*=", argv[0]):
            name, value = argv.pop(0).split("=", 1)
            prefix[name] = value
        for step in _steps(argv, rule, root, snippet):
            step = {**step, "env": prefix} if prefix else step
            # a server's free port differs per step: the same documented server is one step
            key = json.dumps([re.sub(r"^--port=\d+$", "--port", a) for a in step["argv"]])
            if key not in seen:  # `make demo` and its command line: one run
                seen.add(key)
                plan.append({**step, "where": snippet.where})
    return plan


def _fill_placeholders(text: str) -> str:
    names = "|".join(PLACEHOLDERS)
    text = re.sub(rf"\[[^\]]*\b({names})\b[^\]]*\]", "", text)  # optional parts naming one
    text = re.sub(r"\[([^\]]*)\]", r"\1", text) if " [" in text else text
    for name, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w$])'?{name}'?(?!\w)", _quote(value), text)
    return text


def _steps(argv: list[str], rule: Rule, root: Path, snippet: Snippet) -> list[dict]:
    if argv[0] == "make":
        return [s for cmd in _make_recipe(argv[1]) for s in _steps(cmd, rule, root, snippet)]
    if argv[0] == "hf":
        target = root / argv[argv.index("--local-dir") + 1]
        shutil.copytree(GOLDEN_T5, target, dirs_exist_ok=True)  # README and the guide: one copy
        return []
    if Path(argv[0]).name == "tensorboard":
        return [{"argv": [str(root / ".venv/bin/tensorboard"), "--inspect", *argv[1:]],
                 "check": "train/loss"}]  # fmt: skip
    if re.match(r"^(\S*python) -m bf16jax\.\w+\s*$", snippet.text):
        return [{"argv": ["python", "-c", f"import {argv[2]}"]}]
    argv = [dict(rule.replace).get(a, a) for a in argv]
    argv = _shrink(argv, rule)
    if "experiments/pure_bf16_study.py" in argv:
        argv = [a if not a.startswith("--seeds=") else "--seeds=0" for a in argv]
        argv += ["--runs=runs/pure_bf16", "--out=experiments/results/pure_bf16"]
    if rule.background:
        port = _free_port()
        argv = [a if not a.startswith("--port=") else f"--port={port}" for a in argv]
        argv = [str(root / ".venv/bin/python"), *argv[1:]]
        return [{"argv": argv, "background": True,
                 "probe": f"http://localhost:{port}{rule.background}"}]  # fmt: skip
    step = {"argv": argv, "codes": list(rule.codes), "forbid": rule.forbid}
    return [step | ({"check": rule.check} if rule.check else {})]


def _make_recipe(target: str) -> list[list[str]]:
    """The Makefile recipe of `target` as commands, `$(BIN)` = .venv/bin."""
    text = (REPO / "Makefile").read_text()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    cmds = []
    for line in body.splitlines():
        line = line.strip().replace("$(BIN)", ".venv/bin").replace("$(VENV)", ".venv")
        cmds.append(_shell_words(line))
    return cmds


@pytest.mark.slow
def test_documented_commands_run(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    _sandbox(root)
    found = all_snippets()
    plan = _plan(found, root)
    assert len(plan) >= 25, [s["where"] for s in plan]
    for step in plan:
        if step["argv"][0] == "make":
            raise AssertionError(step)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = cli_env(devices=1, PATH=f"{root / '.venv/bin'}:{os.environ['PATH']}")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "doc_driver.py"),
            str(tmp_path / "plan.json"),
            str(tmp_path / "results.json"),
        ],  # fmt: skip
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(plan), proc.stderr[-4000:]
    for step, result in zip(plan, results, strict=True):
        what = f"{result['where']}: {' '.join(result['argv'])[:300]}"
        codes = step.get("codes", [0])
        assert result["code"] in codes, f"{what}\n{result['stderr'][-3000:]}"
        assert "Traceback" not in result["stderr"], f"{what}\n{result['stderr'][-3000:]}"
        if step.get("forbid"):
            assert step["forbid"] not in result["stdout"], f"{what}\n{result['stdout'][-2000:]}"
        if "check" in step:
            assert step["check"] in result["stdout"], f"{what}\n{result['stdout'][-2000:]}"
