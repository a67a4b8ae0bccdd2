"""The precision study: one command trains every model under every policy with several seeds and
answers what each policy costs and what it buys — accuracy, loss, calibration, robustness to
shifted inputs and to adversarial (FGSM / PGD) inputs, agreement with FP32, the precision
diagnostics, step time, throughput and memory — as tables and plots.

    python experiments/precision_study.py --jobs=2              # the full study (CPU: ~1 h idle)
    python experiments/precision_study.py --quick               # CI smoke run (~1 min)
    python experiments/precision_study.py --models=vit_digits --seeds=0,1
    python experiments/precision_study.py --collect_only      # tables + plots of finished runs

Policies: fp32, bf16 (mixed), bf16-pure with round-to-nearest / stochastic rounding / Kahan /
split updates, LSQ QAT w8a8 and w4a8 (BF16 compute), and `bf16;q=fp8` when JAX runs on a GPU.
Models: vit_digits, 1,200 steps with the LR decaying to 1% (held-out accuracy; shifts: noise /
blur / rotation; FGSM and PGD over an eps sweep, QAT models also as their int8 deployment) and
gpt_long (configs/gpt_long.py: 2,500 steps, LR to 1%, where pure-BF16 swamping bites; next-byte
accuracy and loss; shifts: 5% / 15% character corruption); gpt_tiny and t5_small with
`--models`. Diagnostics per run: the mean over the last 40% of logged steps of
`swamped/{all,matrices,norm_gains,decay}` and the final FP32 drift.

Each run is its own process (`--worker`) with a workdir under `--runs`, so the sweep is
resumable: a finished run (its `result.json` exists) is read back, an interrupted one resumes
from its newest checkpoint, and a failed one is reported at the end without stopping the others.
Writes `results.json`, `results.md` and PNG plots (`study_plots.py`) to `--out`.

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
DIAG_KEYS = ("swamped/all", "swamped/matrices", "swamped/norm_gains", "swamped/decay")
DIAG_TAIL = 0.4  # diagnostics: mean over the last 40% of the logged steps
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
    from bf16jax.evaluation import heldout as evaluation
    from bf16jax.training import loop
    from bf16jax.training import metrics as metrics_lib

    workdir = os.path.join(runs, model, run_name(policy, seed))
    config = config_lib.load_config(
        MODELS[model],
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
        "model": model,
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
    path = os.path.join(args.runs, model, run_name(policy, seed), "result.json")
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
        f"{model:10s} {policy:16s} seed {seed}: acc {q['accuracy']:.4f} loss {q['loss']:.4f} "
        f"ece {q['ece']:.4f} ({time.perf_counter() - start:.0f} s)",
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


def _mean_std(values) -> list[float] | None:
    values = [v for v in values if v is not None]
    return [float(np.mean(values)), float(np.std(values))] if values else None


def summarize(results: list[dict]) -> dict:
    """Per model and policy: mean and std over seeds of every reported number."""
    table: dict = {}
    for r in results:
        table.setdefault(r["model"], {}).setdefault(r["policy"], []).append(r)
    out: dict = {}
    for model, by_policy in table.items():
        out[model] = {}
        for policy, rows in by_policy.items():
            entry: dict = {"seeds": sorted(r["seed"] for r in rows)}
            for cond in rows[0]["quality"]:
                for key in ("accuracy", "loss", "ece", "confidence"):
                    entry[f"{cond}/{key}"] = _mean_std(r["quality"][cond][key] for r in rows)
                entry[f"{cond}/agreement"] = _mean_std(
                    r.get("agreement", {}).get(cond) for r in rows
                )
            for key in (
                "step_time_s",
                "throughput",
                "train_bytes_per_param",
                "inference_bytes_per_param",
                "drift_rel_gap",
                "swamped_all",
            ):
                entry[key] = _mean_std(r.get(key) for r in rows)
            for key in DIAG_KEYS:
                entry[key] = _mean_std((r.get("diagnostics") or {}).get(key) for r in rows)
            for target in ("policy", "int8"):
                robust = [(r.get("robustness") or {}).get(target) for r in rows]
                if all(robust):
                    entry[f"robust/{target}"] = {
                        attack: {e: _mean_std(x[attack][e] for x in robust) for e in per}
                        for attack, per in robust[0].items()
                    }
            entry["throughput_unit"] = rows[0]["throughput_unit"]
            out[model][policy] = entry
    return out


def _pm(entry: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    value = entry.get(key)
    if value is None:
        return "–"
    m, s = value
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _pm_value(value, scale: float = 1.0, digits: int = 1) -> str:
    return (
        "–" if value is None else f"{scale * value[0]:.{digits}f} ± {scale * value[1]:.{digits}f}"
    )


def robustness_markdown(model: str, by_policy: dict) -> list[str]:
    """FGSM / PGD accuracy per budget: each policy attacked under itself, and QAT models as
    their int8 deployment (attacked through the fake-quant model's STE gradients)."""
    rows = [
        (f"`{policy}`" + (" int8" if target == "int8" else ""), e[f"robust/{target}"])
        for policy, e in by_policy.items()
        for target in ("policy", "int8")
        if f"robust/{target}" in e
    ]
    if not rows:
        return []
    eps = [e for e in rows[0][1]["fgsm"] if float(e) > 0]
    head = " | ".join(f"{a} ε={e}" for a in ("FGSM", "PGD") for e in eps)
    lines = [
        f"#### {model}: adversarial accuracy % (L∞ budget ε on [0, 1] pixels)",
        "",
        f"| policy | clean | {head} |",
        "| --- | ---: | " + " | ".join(["---:"] * 2 * len(eps)) + " |",
    ]
    for name, robust in rows:
        cells = [_pm_value(robust["fgsm"][next(iter(robust["fgsm"]))], 100)]
        cells += [_pm_value(robust[a][e], 100) for a in ("fgsm", "pgd") for e in eps]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(table: dict, baseline: dict[str, float]) -> str:
    """One table per model: quality, shifted inputs, agreement, diagnostics, cost; then the
    adversarial robustness of image models."""
    lines: list[str] = []
    for model, by_policy in table.items():
        any_entry = next(iter(by_policy.values()))
        shifts = sorted(
            k.split("/")[0] for k in any_entry if k.endswith("/accuracy") and "clean" not in k
        )
        unit = any_entry["throughput_unit"]
        lines += [
            f"### {model}",
            "",
            "| policy | seeds | accuracy % | loss | ECE % | "
            + "".join(f"acc {s} % | " for s in shifts)
            + "agree w/ fp32 % | swamped % | swamped norm gains % | decay lost % | "
            + f"step ms | {unit} | train B/param | infer B/param |",
            "| --- | ---: | ---: | ---: | ---: | "
            + "---: | " * len(shifts)
            + "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for policy, e in by_policy.items():
            cells = [
                f"`{policy}`",
                str(len(e["seeds"])),
                _pm(e, "clean/accuracy", 100),
                _pm(e, "clean/loss", 1, 4),
                _pm(e, "clean/ece", 100),
                *[_pm(e, f"{s}/accuracy", 100) for s in shifts],
                _pm(e, "clean/agreement", 100),
                _pm(e, "swamped/all", 100, 1),
                _pm(e, "swamped/norm_gains", 100, 1),
                _pm(e, "swamped/decay", 100, 1),
                _pm(e, "step_time_s", 1e3, 1),
                _pm(e, "throughput", 1, 0),
                _pm(e, "train_bytes_per_param", 1, 1).split(" ±")[0],
                _pm(e, "inference_bytes_per_param", 1, 2).split(" ±")[0],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if model in baseline:
            lines.append(
                f"\nFor scale: FP32 runs of different seeds agree on {100 * baseline[model]:.2f}% "
                "of the predictions."
            )
        lines.append(
            f"\nswamped: mean over the last {100 * DIAG_TAIL:.0f}% of the logged steps of "
            "`swamped/all` (updates that left the stored weight unchanged: lost under "
            "round-to-nearest, deferred under SR / Kahan; split reads its FP32 master) and "
            "`swamped/norm_gains`; decay lost: `swamped/decay`."
        )
        lines.append("")
        lines += robustness_markdown(model, by_policy)
    return "\n".join(lines)


def main() -> None:
    from bf16jax.cli import script_parser, split_config_overrides

    parser = script_parser(__doc__, "every run's config, after the study's own settings")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list")
    parser.add_argument("--policies", default="", help="comma list; '' = all (+fp8 on a GPU)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list (--quick: 0)")
    parser.add_argument("--out", default="", help="'' = experiments/results/precision_study")
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
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}: use some of {sorted(MODELS)}")
    if user_overrides:  # a misspelt key fails here, not in every worker
        from bf16jax.config import load_config

        for model in models:
            try:
                load_config(MODELS[model], user_overrides)
            except ValueError as e:
                parser.exit(2, f"error: {model}: {e}\n")
    policies = [p for p in args.policies.split(",") if p]
    if args.quick:
        policies, seeds = policies or list(QUICK_POLICIES), [0]
        args.out = args.out or "runs/precision_study_quick/results"
        args.runs = args.runs or "runs/precision_study_quick"
    else:
        policies = policies or list(POLICIES) + (list(GPU_POLICIES) if _on_gpu() else [])
        seeds = [int(s) for s in args.seeds.split(",")]
    args.out = args.out or "experiments/results/precision_study"
    args.runs = args.runs or "runs/precision_study"
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for model in models:
        overrides = [*STUDY_SETTINGS, *MODEL_SETTINGS.get(model, [])]
        if args.quick:
            overrides = [*overrides, *QUICK_SETTINGS[_model_kind(model)], *QUICK_SETTINGS["all"]]
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
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Produced by `{command}` ({_device()}).\n\n{md}\n")
        f.write("\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots))
        f.write("\n")
    print(md)
    if failed and args.collect_only:
        print(f"Not finished (left out): {failed}", file=sys.stderr)
    elif failed:
        sys.exit(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them.")


def _model_kind(model: str) -> str:
    return {"vit_digits": "vit", "gpt_long": "gpt", "gpt_tiny": "gpt", "t5_small": "t5"}[model]


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.device_kind}, {jax.device_count()} device(s), jax {jax.__version__}"


if __name__ == "__main__":
    main()
