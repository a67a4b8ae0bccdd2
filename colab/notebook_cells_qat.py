"""The cells of notebooks 03 (quantization-aware training, int8) and 04 (FLAN-T5 fine-tuning).

Same (kind, source) pairs as `notebook_cells`, which assembles all four notebooks.
"""

from notebook_cells_common import READ_METRICS

# ----------------------------------------------------------------------------- 03 quantization
QUANTIZATION = [
    (
        "markdown",
        """# Quantization-aware training with learned step sizes, then int8 inference

A small ViT on scikit-learn's 8×8 digits (1,797 images, shipped with the package) is trained
three times with `bf16jax.training.loop.train_and_evaluate`: FP32, and with LSQ fake quantization
(Esser et al., arXiv:1902.08153) of every `Linear` except the first layer and the head: `w8a8`
(8-bit weights per output channel, 8-bit inputs per tensor) and `w4a8`. The step sizes are
FP32 params learned with the model. Then the quantized models run with real int8 dots
(int8 × int8 → int32) and are exported / reloaded with int8 kernels.""",
    ),
    ("install", "plots"),
    ("steps", (600, "Training steps per run: 600 is configs/vit_digits.py's length.")),
    (
        "code",
        """import json
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import bf16jax
from bf16jax.config import config_path, load_config
from bf16jax.data.datasets import digits_split
from bf16jax.evaluation.calibration import prediction_agreement
from bf16jax.models import build_model
from bf16jax.nn import quant_model
from bf16jax.training.loop import train_and_evaluate

print("bf16jax", bf16jax.__version__, "| jax", jax.__version__, "| devices:", jax.devices())""",
    ),
    (
        "code",
        '''def vit_digits(precision: str):
    """configs/vit_digits.py for STEPS steps under `precision`."""
    return load_config(
        config_path("vit_digits"),
        [
            f"precision={precision}",
            f"train.steps={STEPS}",
            f"train.log_every={max(1, STEPS // 12)}",
            f"train.eval_every={STEPS}",
            f"optim.warmup_steps={min(50, STEPS // 10)}",
            "checkpoint.every_steps=0",  # only the final checkpoint
        ],
    )''',
    ),
    (
        "markdown",
        """## Train: FP32, w8a8, w4a8

Quantization is part of the policy string: `fp32; q=w8a8` is the FP32 policy with LSQ
quantization of the inner layers.""",
    ),
    (
        "code",
        """WORKDIR = tempfile.TemporaryDirectory(prefix="bf16jax_qat_")
PRECISIONS = ("fp32", "fp32; q=w8a8", "fp32; q=w4a8")
runs = {}
for precision in PRECISIONS:
    workdir = os.path.join(WORKDIR.name, precision.replace("; q=", "_"))
    result = train_and_evaluate(vit_digits(precision), workdir)
    runs[precision] = {"result": result, "dir": workdir}""",
    ),
    ("code", READ_METRICS),
    (
        "code",
        """fig, ax = plt.subplots(figsize=(7, 4))
for precision, run in runs.items():
    rows = [r for r in read_metrics(run["dir"]) if "train/loss" in r]
    ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], label=precision)
ax.set_xlabel("step")
ax.set_ylabel("train loss")
ax.set_yscale("log")
ax.legend()
plt.show()
base = runs["fp32"]["result"]["eval_accuracy"]
for precision, run in runs.items():
    acc = run["result"]["eval_accuracy"]
    gap = 100 * (acc - base)
    print(f"{precision:14s} held-out accuracy {acc:.2%} ({gap:+.2f} points vs fp32)")""",
    ),
    (
        "markdown",
        """## The learned step sizes

Each quantized `Linear` holds `w_log_scale` (one step size per output channel) and
`a_log_scale` (one for its input), FP32 `nnx.Param`s trained by the same AdamW. They are log step
sizes, s = exp(param): s stays positive and Adam moves it by a relative amount. Compare the step
sizes at init (LSQ's 2·mean|w|/sqrt(Qp) for weights, the same formula for a unit-RMS input for
activations; an unsigned range from GELU's minimum for `fc2`) and after training.""",
    ),
    (
        "code",
        """def step_sizes(model) -> dict[str, np.ndarray]:
    # The params hold log step sizes; show s = exp(param), named w_scale / a_scale.
    return {
        "/".join(map(str, path)).replace("_log_scale", "_scale"): np.exp(np.asarray(v[...]))
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if str(path[-1]) in ("w_log_scale", "a_log_scale")
    }


learned, initial = {}, {}
for precision in PRECISIONS[1:]:
    config = vit_digits(precision)
    result = runs[precision]["result"]
    model = result["trainer"].host_model(result["state"])  # the trainer that ran it
    runs[precision]["model"] = model
    learned[precision] = step_sizes(model)
    initial[precision] = step_sizes(build_model(config.model, precision, rngs=nnx.Rngs(0)))

precision = "fp32; q=w4a8"
print(f"{precision}: layer, a_scale init -> learned, mean w_scale init -> learned")
for name in [k for k in learned[precision] if k.endswith("a_scale")]:
    layer = name.removesuffix("/a_scale")
    w0, w1 = initial[precision][layer + "/w_scale"], learned[precision][layer + "/w_scale"]
    a0, a1 = initial[precision][name], learned[precision][name]
    print(f"  {layer:18s} {a0:.4f} -> {a1:.4f}   {w0.mean():.4f} -> {w1.mean():.4f}")""",
    ),
    (
        "code",
        """fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
names = [k.removesuffix("/a_scale") for k in learned[precision] if k.endswith("a_scale")]
x = np.arange(len(names))
ax0.bar(x - 0.2, [initial[precision][n + "/a_scale"] for n in names], 0.4, label="init")
ax0.bar(x + 0.2, [learned[precision][n + "/a_scale"] for n in names], 0.4, label="learned")
ax0.set_xticks(x, names, rotation=90)
ax0.set_title(f"activation step size per layer ({precision})")
ax0.legend()
layer = "blocks/0/mlp/fc1/w_scale"
ax1.plot(initial[precision][layer], label="init")
ax1.plot(learned[precision][layer], label="learned")
ax1.set_xlabel("output channel")
ax1.set_title(f"{layer} ({precision})")
ax1.legend()
plt.show()""",
    ),
    (
        "markdown",
        """## Int8 inference

The fake-quant forward pass multiplies integer codes held in floats, so the same codes in
int8 with an int32 accumulator give the same logits (exactly, while partial sums stay below
2^24). `quant_model.set_int8_mode(model)` switches a model to real int8 dots;
`quant_model.export_int8` / `quant_model.load_int8` save and reload it with int8 kernels
(Orbax).""",
    ),
    (
        "code",
        """images, labels = digits_split("eval")  # the 360 held-out digits
forward = jax.jit(lambda model, x: model(x))
for precision in PRECISIONS[1:]:
    model = runs[precision]["model"]
    fake = forward(model, images)
    real = forward(quant_model.set_int8_mode(nnx.clone(model)), images)
    export_dir = os.path.join(WORKDIR.name, "int8_" + precision.split("=")[1])
    quant_model.export_int8(model, export_dir)
    config = vit_digits(precision)
    loaded = quant_model.load_int8(
        export_dir,
        lambda config=config: build_model(config.model, config.precision, rngs=nnx.Rngs(0)),
    )
    exported = forward(loaded, images)
    layers = quant_model.quantized_layers(loaded)
    kernels = sorted({str(layer.kernel[...].dtype) for _, layer in layers})
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    int8_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(loaded, nnx.Param)))
    print(f"{precision}:")
    diff = float(np.max(np.abs(np.asarray(real) - np.asarray(fake))))
    print(
        f"  accuracy fake-quant {np.mean(np.argmax(fake, -1) == labels):.2%}, "
        f"real int8 {np.mean(np.argmax(real, -1) == labels):.2%}"
    )
    print(
        "  argmax agreement int8 vs fake-quant "
        f"{prediction_agreement(fake, real):.2%}, "
        f"max |logit difference| {diff:.2e}"
    )
    print(
        f"  exported + reloaded equals int8 mode: {np.array_equal(exported, real)}; "
        f"quantized kernels {kernels}; params {float_bytes:,} -> {int8_bytes:,} bytes"
    )""",
    ),
    (
        "markdown",
        """## What this shows

Measured by running this notebook with the default `STEPS = 600` on a shared 2-core CPU (one
run, seed 0): __QUANT_NUMBERS__

Quantization-aware training with learned step sizes costs no accuracy here, and the fake-quant
model *is* the int8 model: real int8 dots reproduce its predictions. One seed on 360 test
images (1 image = 0.28 points): differences of a point or two between runs are noise.""",
    ),
]

# ----------------------------------------------------------------------------- 04 pretrained
PRETRAINED = [
    (
        "markdown",
        """# Fine-tuning FLAN-T5 in BF16 from its published files

`python -m bf16jax.convert` turns a Hugging Face model directory (config.json +
model.safetensors + tokenizer files) into a bf16jax checkpoint; `configs/flan_t5_small_ft.py`
then fine-tunes it on KJV verse continuation ("continue: <verse>" -> the next verse) with the
model's own SentencePiece tokenizer, under `bf16` and pure `bf16-pure-kahan`; `export` writes a
transformers directory again. On Colab the first cell downloads `google/flan-t5-small`
(300 MB); elsewhere (and in the tests, offline) a tiny random FLAN-T5-shaped checkpoint from
the repository's `tests/golden/` stands in, so the losses then mean nothing.""",
    ),
    ("install", "plots"),
    ("steps", (60, "Fine-tuning steps per policy.")),
    (
        "code",
        """import filecmp
import json
import os
import pathlib
import sys
import tempfile

import matplotlib.pyplot as plt

from bf16jax.config import config_path, load_config
from bf16jax.data.tokenizer import load_tokenizer
from bf16jax.interop import convert
from bf16jax.training.loop import train_and_evaluate

WORK = tempfile.mkdtemp(prefix="bf16jax_ft_")
if "google.colab" in sys.modules:
    from huggingface_hub import snapshot_download

    HF_DIR = snapshot_download(
        "google/flan-t5-small", allow_patterns=["*.json", "*.model", "*.safetensors"]
    )
else:  # offline: the tiny random FLAN-T5-shaped checkpoint the tests use
    HF_DIR = str(pathlib.Path(config_path("flan_t5_small_ft")).parents[1] / "tests/golden/t5_v1_1")
print(HF_DIR, sorted(os.listdir(HF_DIR)))""",
    ),
    (
        "markdown",
        """## Import

Params are stored in the policy's param dtype (`bf16`: FP32 master weights). A config that
bf16jax would compute differently (another activation, a non-zero pad id, ...) is refused
naming the field.""",
    ),
    (
        "code",
        """CONVERTED = os.path.join(WORK, "converted")
manifest = convert.import_hf(HF_DIR, CONVERTED, precision="bf16")
print(json.dumps(manifest["model"], indent=1))
tok = load_tokenizer(CONVERTED)
ids = tok.encode("continue: Jesus wept.", add_eos=True)
print(tok, "|", ids.tolist(), "->", repr(tok.decode(ids)))""",
    ),
    (
        "markdown",
        """## Fine-tune under `bf16` and `bf16-pure-kahan`

`init_from` takes the architecture and params from the converted directory, with a fresh
optimizer state at step 0; the pretrained model's held-out loss is logged at step 0.""",
    ),
    (
        "code",
        """def finetune(precision: str) -> dict:
    config = load_config(
        config_path("flan_t5_small_ft"),
        [
            f"init_from={CONVERTED}",
            f"precision={precision}",
            f"train.steps={STEPS}",
            f"train.log_every={max(1, STEPS // 10)}",
            f"train.eval_every={STEPS}",
            "train.eval_steps=4",
            "data.enc_len=48",
            "data.dec_len=48",
            "data.batch_size=16",
            "data.eval_batch_size=16",
            "checkpoint.every_steps=0",
        ],
    )
    return train_and_evaluate(config, os.path.join(WORK, precision))


results = {p: finetune(p) for p in ("bf16", "bf16-pure-kahan")}
for p, r in results.items():
    print(f"{p}: held-out loss {r['init_eval_loss']:.4f} before -> {r['eval_loss']:.4f} after")""",
    ),
    (
        "code",
        """for p in results:
    with open(os.path.join(WORK, p, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "train/loss" in r]
    plt.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], label=p)
plt.xlabel("step")
plt.ylabel("train loss")
plt.legend()
plt.show()""",
    ),
    (
        "markdown",
        """## Export

`export` writes the fine-tuned params as a transformers directory; exporting the converted
(untrained) model reproduces the original files byte for byte.""",
    ),
    (
        "code",
        """FINETUNED = os.path.join(WORK, "bf16")
convert.export_hf(CONVERTED, os.path.join(WORK, "hf_ft"), checkpoint=FINETUNED)
convert.export_hf(CONVERTED, os.path.join(WORK, "hf_same"))
print(sorted(os.listdir(os.path.join(WORK, "hf_ft"))))
same = filecmp.cmp(
    os.path.join(HF_DIR, "model.safetensors"),
    os.path.join(WORK, "hf_same", "model.safetensors"),
    shallow=False,
)
print("import -> export byte-identical:", same)""",
    ),
    (
        "markdown",
        """## What this shows

Measured by running this notebook offline (the tiny random stand-in, not FLAN-T5-small) with
the default `STEPS = 60` on a shared 2-core CPU: __PRETRAINED_NUMBERS__""",
    ),
]
