"""The precision study: one command trains every model under every policy with several seeds and
answers what each policy costs and what it buys — accuracy, loss, calibration, robustness to
shifted inputs and to adversarial (FGSM / PGD) inputs, agreement with FP32, the precision
diagnostics, step time, throughput and memory — as tables and plots.

    python experiments/precision_study.py --jobs=2              # the full study (CPU: ~1 h idle)
    python experiments/precision_study.py --quick               # CI smoke run (~1 min)
    python experiments/precision_study.py --models=vit_digits --seeds=0,1
    python experiments/precision_study.py --models=configs/t5_small.py --quick  # any config
    python experiments/precision_study.py --collect_only      # tables + plots of finished runs
    python experiments/precision_study.py --replot=experiments/results/precision_study/results.json

Policies: fp32, bf16 (mixed), bf16-pure with round-to-nearest / stochastic rounding / Kahan /
split updates, LSQ QAT w8a8 and w4a8 (BF16 compute), and `bf16;q=fp8` when JAX runs on a GPU.
Models: vit_digits, 1,200 steps with the LR decaying to 1% (held-out accuracy; shifts: noise /
blur / rotation; FGSM and PGD over an eps sweep, QAT models also as their int8 deployment) and
gpt_long (configs/gpt_long.py: 2,500 steps, LR to 1%, where pure-BF16 swamping bites; next-byte
accuracy and loss; shifts: 5% / 15% character corruption); gpt_tiny, t5_small or any config
file (`--models=configs/NAME.py`, its runs and rows named by the file's stem) with `--models`.
Diagnostics per run: the mean over the last 40% of logged steps of
`swamped/{all,matrices,norm_gains,decay}` and the final FP32 drift.

Each run is its own process (`--worker`) with a workdir under `--runs`, so the sweep is
resumable: a finished run (its `result.json` exists) is read back, an interrupted one resumes
from its newest checkpoint, and a failed one is reported at the end without stopping the others.
Writes `results.json`, `results.md` and PNG plots (`study_plots.py`) to `--out`, by default
RUNS/results: the committed experiments/results/ are replaced only when named. `--replot`
redraws a results.json's table plots and results.md without training (`study_tables.py`).

Memory is counted from the abstract train state (exact bytes, whatever the device): training =
params + optimizer state (update-rule buffers included) per parameter; inference = the weights
as deployed (quantized kernels as int8 codes, other floats in the compute dtype). Step time is
the median over logged windows; on a shared CPU it is noisy, so compare it within one study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from study_tables import DIAG_KEYS, DIAG_TAIL, markdown, summarize

MODELS = {
    "vit_digits": "configs/vit_digits.py",
    "gpt_long": "configs/gpt_long.py",
    "gpt_tiny": "configs/gpt_tiny.py",
    "t5_small": "configs/t5_small.py",
}
DEFAULT_MODELS = ("vit_digits", "gpt_long")
POLICIES = (
    "fp32",
    "bf16",
    "bf16-pure",
    "bf16-pure-sr",
    "bf16-pure-kahan",
    "bf16-pure-split",
    "bf16;q=w8a8",
    "bf16;q=w4a8",
)
GPU_POLICIES = ("bf16;q=fp8",)
REFERENCE = "fp32"
# Every run: dense loss curves, no text samples. Per model: long enough for the LR to decay.
STUDY_SETTINGS = ["train.log_every=10", "train.sample_tokens=0"]
MODEL_SETTINGS = {
    "vit_digits": [
        "train.steps=1200",
        "optim.min_lr_ratio=0.01",
        "train.eval_every=400",
        "checkpoint.every_steps=400",
    ],
}
# Adversarial robustness (image models): L-infinity budgets on [0, 1] pixels, PGD iterations.
EPSILONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
PGD_STEPS = 10
QUICK_ATTACK = {"eps": (0.0, 0.1), "pgd_steps": 2}
QUICK_POLICIES = ("fp32", "bf16-pure-split", "bf16;q=w8a8")
QUICK_SETTINGS = {
    "gpt": [
        "model.num_layers=1",
        "model.embed_dim=32",
        "model.num_heads=2",
        "model.mlp_dim=64",
        "model.max_len=32",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.eval_batch_size=8",
    ],
    "vit": ["model.num_layers=1", "model.embed_dim=32", "model.mlp_dim=64"],
    "t5": ["model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.embed_dim=32"],
    "all": [
        "train.diagnostics=false",
        "train.drift_every=-1",
        "train.steps=6",
        "train.log_every=2",
        "train.eval_every=6",
        "train.eval_steps=1",
        "checkpoint.every_steps=3",
    ],
}
EVAL_SEED = 0  # the shifted inputs are the same for every run


def config_file(model: str) -> str:
    """The config of `model`: a built-in name (MODELS) or the path of any configs-style file."""
    if model in MODELS:
        return MODELS[model]
    if model.endswith(".py") and os.path.isfile(model):
        return model
    raise ValueError(
        f"unknown model {model!r}: use one of {sorted(MODELS)} or a config file path "
        "(e.g. configs/t5_base.py)"
    )


def model_id(model: str) -> str:
    """The name a model's runs and rows go under: a built-in name, or its config file's stem."""
    return model if model in MODELS else os.path.splitext(os.path.basename(model))[0]


def run_name(policy: str, seed: int) -> str:
    """A directory name for (policy, seed): `bf16;q=w8a8` -> `bf16_q-w8a8_seed0`."""
    return f"{policy.replace(';', '_').replace('=', '-').replace(',', '+')}_seed{seed}"


# ----------------------------------------------------------------------------- one run (worker)
def _curve(workdir: str) -> dict[str, list]:
    """Train and eval loss per step, and the diagnostics' means over the last `DIAG_TAIL` of the
    logged steps, from metrics.jsonl (the last row wins on a resumed run)."""
    train, ev, step_times, diag = {}, {}, {}, {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                train[row["step"]] = row["train/loss"]
                step_times[row["step"]] = row.get("train/step_time_s")
                diag[row["step"]] = {k: row[f"train/{k}"] for k in DIAG_KEYS if f"train/{k}" in row}
            if "eval/loss" in row:
                ev[row["step"]] = row["eval/loss"]
    times = [t for s, t in sorted(step_times.items())[1:] if t]  # first window: warm-up
    tail = [diag[s] for s in sorted(diag)[int(len(diag) * (1 - DIAG_TAIL)) :]]
    return {
        "train_steps": sorted(train),
        "train_loss": [train[s] for s in sorted(train)],
        "eval_steps": sorted(ev),
        "eval_loss": [ev[s] for s in sorted(ev)],
        "step_time_s": float(np.median(times)) if times else None,
        "diagnostics": {
            k: float(np.mean([d[k] for d in tail])) for k in DIAG_KEYS if tail and k in tail[0]
        },
    }


def _robustness(trainer, state, epsilons, pgd_steps: int) -> dict:
    """FGSM / PGD accuracy of the run's model (attacked under its own policy) and, for a QAT
    model, of its int8 deployment (attacked through the fake-quant model's STE gradients)."""
    from flax import nnx

    from bf16jax.evaluation import attacks
    from bf16jax.nn import quant_model

    model = trainer.host_model(state)
    batches = [(b["image"], b["label"]) for b in trainer.eval_batches()]
    targets = {"policy": model}
    if quant_model.quantized_layers(model):
        targets["int8"] = quant_model.to_int8(nnx.clone(model))
    out = {}
    for name, target in targets.items():
        acc = attacks.adversarial_accuracy(
            model, target, batches, epsilons, pgd_steps=pgd_steps, seed=EVAL_SEED
        )
        # JSON keys: eps as text ("0.05"), the same after a round trip through result.json.
        out[name] = {a: {f"{e:g}": v for e, v in per.items()} for a, per in acc.items()}
    return out


def _inference_bytes(trainer) -> float:
    """Bytes per parameter of the deployed weights: int8 codes for quantized kernels (to_int8),
    every other float in the compute dtype."""
    import jax
    from flax import nnx

    from bf16jax.models import build_model
    from bf16jax.nn import quant_model

    cfg, policy = trainer.config, trainer.policy

    def make():
        model = build_model(cfg.model, policy, rngs=nnx.Rngs(0))
        return quant_model.to_int8(model) if quant_model.quantized_layers(model) else model

    with nnx.use_eager_sharding(False):
        params = nnx.state(nnx.eval_shape(make), nnx.Param)
    total = 0
    for leaf in jax.tree.leaves(params):
        dtype = np.dtype(leaf.dtype)
        if np.issubdtype(dtype, np.floating):
            dtype = np.dtype(policy.compute_dtype)
        total += int(np.prod(leaf.shape)) * dtype.itemsize
    return total / trainer.n_params


def run_one(
    model: str,
    policy: str,
    seed: int,
    runs: str,
    overrides: list[str],
    epsilons=EPSILONS,
    pgd_steps: int = PGD_STEPS,
) -> dict:
    """Trains (or resumes) one run, evaluates it clean, shifted and (images) under attack,
    writes result.json."""
    from bf16jax import config as config_lib
    from bf16jax.data import provenance
    from bf16jax.evaluation import heldout as evaluation
    from bf16jax.training import loop
    from bf16jax.training import metrics as metrics_lib

    workdir = os.path.join(runs, model_id(model), run_name(policy, seed))
    config = config_lib.load_config(
        config_file(model),
        [f"precision={policy}", f"seed={seed}", f"data.seed={seed}", *overrides],
    )
    start = time.perf_counter()
    out = loop.train_and_evaluate(config, workdir)
    state, trainer = out.pop("state"), out.pop("trainer")
    summary, preds = evaluation.evaluate_quality(
        trainer, state.params, state.fp8_meta, seed=EVAL_SEED
    )
    np.savez_compressed(
        os.path.join(workdir, "predictions.npz"),
        **{
            f"{cond}/{key}": stats[key]
            for cond, stats in preds.items()
            for key in ("prediction", "confidence", "correct", "weight")
        },
    )
    abstract, n = trainer.abstract, trainer.n_params
    param_b = metrics_lib.bytes_per_param(abstract.params, n)
    opt_b = metrics_lib.bytes_per_param(abstract.opt_state, n)
    curve = _curve(workdir)
    step_s = curve.pop("step_time_s")
    robustness = None
    if config.model.name == "vit":
        robustness = _robustness(trainer, state, epsilons, pgd_steps)
    result = {
        "model": model_id(model),
        "config_file": config_file(model),
        # What it trained and was measured on (a prepared set: its path and metadata hash).
        "data": provenance.describe(config.data),
        "policy": policy,
        "seed": seed,
        "steps": int(config.train.steps),
        "n_params": n,
        "quality": summary,
        "step_time_s": step_s,
        "throughput": loop.tokens_per_step(config) / step_s if step_s else None,
        "throughput_unit": "examples/s" if config.model.name == "vit" else "tokens/s",
        "compile_s": out.get("compile_s"),
        "train_bytes_per_param": param_b + opt_b,
        "param_bytes_per_param": param_b,
        "inference_bytes_per_param": _inference_bytes(trainer),
        "drift_rel_gap": out.get("drift_rel_gap"),
        "swamped_all": out.get("swamped/all"),
        "diagnostics": curve.pop("diagnostics"),
        "robustness": robustness,
        "skipped": out.get("skipped"),
        "curve": curve,
        "wall_s": time.perf_counter() - start,
        "overrides": overrides,
    }
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


# ----------------------------------------------------------------------------- the sweep
def _launch(model, policy, seed, args, overrides) -> dict | None:
    path = os.path.join(args.runs, model_id(model), run_name(policy, seed), "result.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if args.collect_only:
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, policy, str(seed)]
    cmd += ["--runs", args.runs, *[f"--config.{kv}" for kv in overrides]]
    cmd += [f"--eps={','.join(map(str, args.eps))}", f"--pgd_steps={args.pgd_steps}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not os.path.exists(path):
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(f"FAILED {model} {policy} seed {seed}:\n{tail}", file=sys.stderr, flush=True)
        return None
    with open(path) as f:
        result = json.load(f)
    q = result["quality"]["clean"]
    print(
        f"{model_id(model):10s} {policy:16s} seed {seed}: acc {q['accuracy']:.4f} "
        f"loss {q['loss']:.4f} ece {q['ece']:.4f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return result


def _load_predictions(args, model: str, policy: str, seed: int) -> dict[str, dict]:
    path = os.path.join(args.runs, model, run_name(policy, seed), "predictions.npz")
    preds: dict[str, dict] = {}
    with np.load(path) as data:
        for key in data.files:
            cond, name = key.split("/")
            preds.setdefault(cond, {})[name] = data[key]
    return preds


def add_agreement(args, results: list[dict]) -> None:
    """Adds `agreement[condition]` with the FP32 run of the same model and seed, in place."""
    from bf16jax.evaluation import heldout as evaluation

    cache: dict = {}
    for r in results:
        ref_key = (r["model"], REFERENCE, r["seed"])
        if not any((x["model"], x["policy"], x["seed"]) == ref_key for x in results):
            continue
        if ref_key not in cache:
            cache[ref_key] = _load_predictions(args, *ref_key)
        preds = _load_predictions(args, r["model"], r["policy"], r["seed"])
        r["agreement"] = evaluation.agreement_with(preds, cache[ref_key])


def seed_agreement(args, results: list[dict]) -> dict[str, float]:
    """Per model, the mean agreement between FP32 runs of different seeds (clean eval): how much
    a change of seed alone moves the predictions, the yardstick for `agree w/ fp32`."""
    from bf16jax.evaluation import calibration as metrics_lib

    out = {}
    for model in dict.fromkeys(r["model"] for r in results):
        seeds = sorted(
            r["seed"] for r in results if (r["model"], r["policy"]) == (model, REFERENCE)
        )
        preds = {s: _load_predictions(args, model, REFERENCE, s)["clean"] for s in seeds}
        pairs = [
            metrics_lib.agreement(
                preds[a]["prediction"], preds[b]["prediction"], preds[a]["weight"]
            )
            for i, a in enumerate(seeds)
            for b in seeds[i + 1 :]
        ]
        if pairs:
            out[model] = float(np.mean(pairs))
    return out


def pooled_bins(args, results: list[dict], model: str, policy: str) -> dict:
    """Reliability bins of the clean eval predictions pooled over seeds."""
    from bf16jax.evaluation import calibration as metrics_lib

    parts = [
        _load_predictions(args, model, policy, r["seed"])["clean"]
        for r in results
        if r["model"] == model and r["policy"] == policy
    ]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("confidence", "correct", "weight")}
    return metrics_lib.calibration_bins(cat["confidence"], cat["correct"], cat["weight"])


def main() -> None:
    from bf16jax.cli import script_parser, split_config_overrides

    parser = script_parser(__doc__, "every run's config, after the study's own settings")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma list of {', '.join(MODELS)} or config file paths (configs/NAME.py)",
    )
    parser.add_argument("--policies", default="", help="comma list; '' = all (+fp8 on a GPU)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list (--quick: 0)")
    parser.add_argument(
        "--out",
        default="",
        help="'' = RUNS/results (never the committed experiments/results: name it to replace it)",
    )
    parser.add_argument(
        "--replot",
        default="",
        help="a results.json: redraw its table's plots (accuracy vs memory, robustness) and "
        "results.md into --out (default: beside it), training nothing",
    )
    parser.add_argument("--runs", default="", help="workdirs; '' = runs/precision_study")
    parser.add_argument("--quick", action="store_true", help="tiny models, 6 steps, 1 seed")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument(
        "--collect_only",
        action="store_true",
        help="train nothing: tabulate and plot the finished runs (missing ones are listed)",
    )
    eps = ",".join(map(str, EPSILONS))
    parser.add_argument("--eps", default="", help=f"attack budgets; '' = {eps}")
    parser.add_argument("--pgd_steps", type=int, default=0, help=f"0 = {PGD_STEPS}")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "POLICY", "SEED"), help="one run")
    rest, user_overrides = split_config_overrides(sys.argv[1:])
    args = parser.parse_args(rest)
    eps_default = QUICK_ATTACK["eps"] if args.quick else EPSILONS
    args.eps = [float(e) for e in args.eps.split(",") if e] or list(eps_default)
    args.pgd_steps = args.pgd_steps or (QUICK_ATTACK["pgd_steps"] if args.quick else PGD_STEPS)
    if args.worker:
        model, policy, seed = args.worker
        run_one(model, policy, int(seed), args.runs, user_overrides, args.eps, args.pgd_steps)
        return
    if args.replot:
        replot(args.replot, args.out or os.path.dirname(os.path.abspath(args.replot)))
        return
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS and not m.endswith(".py")]
    if unknown:
        parser.error(
            f"unknown model(s) {unknown}: use some of {sorted(MODELS)} or config file paths"
        )
    from bf16jax.config import load_config

    kinds = {}
    for model in models:  # a missing file or a misspelt key fails here, not in every worker
        try:
            kinds[model] = load_config(config_file(model), user_overrides).model.name
        except (ValueError, OSError) as e:
            parser.exit(2, f"error: {model}: {e}\n")
    policies = [p for p in args.policies.split(",") if p]
    if args.quick:
        policies, seeds = policies or list(QUICK_POLICIES), [0]
        args.runs = args.runs or "runs/precision_study_quick"
    else:
        policies = policies or list(POLICIES) + (list(GPU_POLICIES) if _on_gpu() else [])
        seeds = [int(s) for s in args.seeds.split(",")]
    args.runs = args.runs or "runs/precision_study"
    args.out = args.out or os.path.join(args.runs, "results")
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for model in models:
        overrides = [*STUDY_SETTINGS, *MODEL_SETTINGS.get(model, [])]
        if args.quick:
            overrides = [*overrides, *QUICK_SETTINGS[kinds[model]], *QUICK_SETTINGS["all"]]
        overrides += user_overrides  # last: the user's word wins
        jobs += [(model, policy, seed, args, overrides) for seed in seeds for policy in policies]
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:  # threads only wait on subprocesses
        outcomes = list(pool.map(lambda job: _launch(*job), jobs))
    results = [r for r in outcomes if r]
    failed = [job[:3] for job, r in zip(jobs, outcomes, strict=True) if not r]
    if not results:
        sys.exit("No run finished; see the errors above.")
    add_agreement(args, results)
    table = summarize(results)
    baseline = seed_agreement(args, results)
    command = " ".join(["python", *sys.argv])
    from study_plots import write_plots  # experiments/ is on sys.path when run as a script

    bins = {m: {p: pooled_bins(args, results, m, p) for p in table[m]} for m in table}
    plots = write_plots(args.out, results, table, bins)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        slim = [{k: v for k, v in r.items() if k != "curve"} for r in results]
        json.dump(
            {"command": command, "table": table, "fp32_seed_agreement": baseline, "runs": slim},
            f,
            indent=1,
        )
    md = markdown(table, baseline)
    data = data_lines(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Produced by `{command}` ({_device()}).\n\n{data}\n\n{md}\n")
        f.write("\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots))
        f.write("\n")
    print(md)
    if failed and args.collect_only:
        print(f"Not finished (left out): {failed}", file=sys.stderr)
    elif failed:
        sys.exit(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them.")


def data_lines(results: list[dict]) -> str:
    """One line per model naming the data its runs trained and were evaluated on."""
    from bf16jax.data import provenance

    seen = {}
    for r in results:
        seen.setdefault(r["model"], provenance.summary(r.get("data")))
    return "\n".join(f"Data of {m}: {line} (train split; eval split)." for m, line in seen.items())


def replot(results_json: str, out: str) -> list[str]:
    """Redraws what a results.json holds without training: the accuracy-vs-memory and
    robustness plots and results.md (the loss curves and reliability diagrams need the runs'
    curves and predictions, which results.json does not keep: rerun with --collect_only)."""
    from study_plots import draw_accuracy_vs_memory, draw_robustness, save_figure

    with open(results_json) as f:
        saved = json.load(f)
    table = saved["table"]
    os.makedirs(out, exist_ok=True)
    paths = [save_figure(draw_accuracy_vs_memory(table), out, "accuracy_vs_memory.png")]
    for model, by_policy in table.items():
        if any("robust/policy" in e for e in by_policy.values()):
            fig = draw_robustness(by_policy, model)
            paths.append(save_figure(fig, out, f"robustness_{model}.png"))
    md = markdown(table, saved.get("fp32_seed_agreement", {}))
    md_path = os.path.join(out, "results.md")
    preamble, images = [f"Produced by `{saved['command']}`.", ""], []
    if os.path.exists(md_path):  # keep its notes (how the runs were made) and image list
        with open(md_path) as f:
            old = f.read().splitlines()
        first = next((i for i, ln in enumerate(old) if ln.startswith("### ")), len(old))
        preamble = [ln for ln in old[:first] if not ln.startswith("Tables and plots redrawn")]
        images = [ln for ln in old if ln.startswith("![")]
    while preamble and not preamble[-1].strip():
        preamble.pop()
    redraw = f"python experiments/precision_study.py --replot={results_json}"
    images = images or [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths]
    with open(md_path, "w") as f:
        f.write("\n".join([*preamble, "", f"Tables and plots redrawn by `{redraw}`.", ""]))
        f.write(f"\n{md}\n" + "\n".join(images) + "\n")
    print("\n".join(paths + [md_path]))
    return paths


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.device_kind}, {jax.device_count()} device(s), jax {jax.__version__}"


if __name__ == "__main__":
    main()
