"""experiments/aot_tpu.py on CPU devices: the TPU-pod memory report cannot rot without CI
noticing, its numbers must agree with the sharded state's size, the full-depth FLOPs
extrapolation must match the model FLOPs, and a rerun must replace a case's old rows. Three
compiles of 1-2 layer models with fast XLA backend options (same HLO, half the compile time)."""

import importlib.util
import os
import sys

import jax
from tiny import make_mesh, tiny_gpt_config

from bf16jax.training import loop
from bf16jax.training import trainer as train

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "aot_tpu.py")
_spec = importlib.util.spec_from_file_location("aot_tpu", _PATH)
aot_tpu = importlib.util.module_from_spec(_spec)
sys.modules["aot_tpu"] = aot_tpu  # dataclasses look their module up there
_spec.loader.exec_module(aot_tpu)


def _config(policy, num_layers, scan):
    c = tiny_gpt_config(policy).copy_and_resolve_references()
    c.model.update(num_layers=num_layers, scan_layers=scan, remat="full" if scan else "none")
    return c


def test_aot_report_matches_sharded_state(tmp_path):
    """One scanned, rematerialized, FSDP-sharded step over 8 devices, like the pod configs."""
    config = _config("bf16", num_layers=2, scan=True)
    row = aot_tpu.aot_compile(
        config,
        make_mesh((1, 8, 1)),
        hbm_bytes=16 * aot_tpu.GIB,
        full_depth_flops=False,
        compiler_options=aot_tpu.FAST_CPU_COMPILE,
    )
    assert row["fits"] and 0 < row["peak_bytes"] < 0.01 * 16 * aot_tpu.GIB
    # The compiled step's arguments are exactly the state's and the batch's shards.
    assert row["argument_bytes"] == row["state_bytes_per_device"] + row["batch_bytes_per_device"]
    # The state is donated: its output buffers alias the arguments.
    assert row["alias_bytes"] >= 0.99 * row["state_bytes_per_device"]
    assert row["peak_bytes"] >= row["argument_bytes"] + row["temp_bytes"]
    # FSDP over 8 devices: the state per device is ~1/8 of the whole (norm scales and scalars
    # are replicated: a few % of this model's bytes), a wrong sharding gives ~8/8.
    ratio = row["state_bytes_per_device"] * 8 / row["state_bytes_global"]
    assert 1.0 <= ratio < 1.15, ratio
    # Mixed precision keeps FP32 params: 4 + 8 (AdamW moments) bytes per param.
    per_param = row["state_bytes_global"] / row["params"]
    assert 12.0 <= per_param < 12.5, per_param
    # Skipped extrapolation is reported as unknown, not as the loop-body-once figure.
    assert row["xla_flops_per_device"] > 0 and row["xla_flops_per_device_full_depth"] is None

    # Markdown: the step time at peak in ms with significant digits (a T5 step printed 0.00 s).
    base = {"config": "tiny", "topology": "cpu-8", "libtpu_topology": "-"}
    old = [
        row
        | base
        | {"variant": "as configured", "fits": False, "argument_bytes": None, "oom": "OOM"},
        row | base | {"variant": "grad_accum=2"},
        row | base | {"config": "other", "variant": "as configured"},
    ]
    aot_tpu.write_results(old, "old run", str(tmp_path))
    new = row | base | {"variant": "as configured", "step_s_at_peak": 0.004567}
    aot_tpu.write_results([new], "new run", str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "| tiny | cpu-8" in text and "    new run" in text
    assert "| 4.57 |" in text
    # The rerun replaced all of its case's rows (the grad-accumulation fallback is stale);
    # another case's rows stay.
    assert "grad_accum=2" not in text and "| other | cpu-8" in text
    assert text.count("| tiny | cpu-8 (") == 1
    # The remat choice per case: the one fitting row of this case.
    assert "## Remat policy per case" in text and "| tiny | cpu-8 | bf16 | full |" in text


def test_full_depth_flops_match_the_model_flops():
    """The extrapolation from unrolled 1- and 2-layer compiles (on one device: it does not depend
    on the mesh, and SPMD compiles are slower) to a 24-layer model, which is never compiled."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    config = _config("bf16", num_layers=24, scan=False)
    flops = aot_tpu.unrolled_flops(config, mesh, aot_tpu.FAST_CPU_COMPILE)
    assert flops["per_layer"] > 0
    # Without remat XLA counts the 6N + 6LTD model FLOPs plus the FP32 loss, softmax and
    # optimizer (1.25x here); the loop-body-once figure of 1-2 layers would be ~0.15x.
    # The parameter count from the scanned twin: tracing 24 unrolled layers costs ~15 s.
    n_params = train.create_trainer(_config("bf16", 24, scan=True), mesh=mesh).n_params
    model = loop.flops_per_token(config, n_params) * loop.tokens_per_step(config)
    assert 1.0 < flops["total"] / model < 1.6, flops["total"] / model


def test_pallas_attention_flops_and_remat_choice():
    """The analytic FLOPs of attention inside the Pallas kernel (XLA counts none there) and the
    choice of remat policy per case. No compile."""
    c = aot_tpu.load_config("gpt_1b")
    c.precision = "bf16"
    assert aot_tpu.attention_kernel(c, "tpu") == "pallas"  # auto on a TPU
    assert aot_tpu.attention_kernel(c, "cpu") == "xla"
    mesh = make_mesh((1, 8, 1))  # 256 sequences over 8 devices: 32 each
    t, d, layers = 2048, 2048, 24
    # Blocks of 512: 4 x 4 tiles, 10 at or below the diagonal; 2 + 7 matmuls of 2 T^2 D each,
    # plus the forward again under remat.
    c.model.remat = "none"
    want = 2 * 9 * t * t * d * (10 / 16) * layers * 32
    assert aot_tpu.pallas_attention_flops(c, mesh) == want
    c.model.remat = "save_dots"
    assert aot_tpu.pallas_attention_flops(c, mesh) == want * 11 / 9
    c.data.seq_len = 200  # no 128-multiple tile: "auto" falls back to XLA
    assert aot_tpu.attention_kernel(c, "tpu") == "xla"

    case = {"config": "gpt_1b", "topology": "v5e-64", "policy": "bf16", "variant": "as configured"}
    case |= {"grad_accum_steps": 1}
    rows = [
        case | {"remat": "none", "fits": False, "step_s_at_peak": None},
        # Fewer FLOPs, but only with 4 micro-batches (4x the FSDP weight gathers): not chosen.
        case
        | {"remat": "none", "variant": "grad_accum=4", "grad_accum_steps": 4, "fits": True}
        | {"step_s_at_peak": 0.36, "peak_bytes": 9e9},
        case | {"remat": "save_dots", "fits": True, "step_s_at_peak": 0.40, "peak_bytes": 14e9},
        case | {"remat": "full", "fits": True, "step_s_at_peak": 0.46, "peak_bytes": 5e9},
        case | {"remat": True, "fits": True, "step_s_at_peak": 0.46, "peak_bytes": 5e9},
    ]
    best = aot_tpu.choose_remat(rows)
    assert list(best) == [("gpt_1b", "v5e-64", "bf16")]
    assert best[("gpt_1b", "v5e-64", "bf16")]["remat"] == "save_dots"
    # Old rows recorded remat as a bool: the same case as "full".
    assert aot_tpu._key(rows[4]) == aot_tpu._key(rows[3])
