"""experiments/program_compare.py's HLO counter, on a hand-written module and on XLA:CPU's own
optimized HLO (the TPU compiles themselves need libtpu: `make aot-tpu-compare`)."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "experiments"))
import program_compare  # noqa: E402

HLO = """HloModule m

%fused_computation (p0: f32[8,4]) -> f32[8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %c = bf16[8,4]{1,0} convert(%p0)
  %d = f32[8,4]{1,0} convert(%c)
  %z = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%d, %z), dimensions={1}, to_apply=%add
}

%cast (p: f32[8,8]) -> bf16[8,8] {
  %p = f32[8,8]{1,0} parameter(0)
  ROOT %c = bf16[8,8]{1,0} convert(%p)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8,4]) -> (f32[8], f32[4,8]) {
  %x = f32[8,4]{1,0} parameter(0)
  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation
  %t = f32[8,4]{0,1} copy(%x)
  %cs = (f32[8,4]{1,0:S(1)}, f32[8,4]{1,0}, u32[]) copy-start(%x)
  %k = f32[4,8]{1,0} custom-call(%t), custom_call_target="tpu_custom_call"
  %g = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %gc = bf16[8,8]{1,0} fusion(%g), kind=kLoop, calls=%cast

  %cv = bf16[8]{0} convert(%f)
  ROOT %out = (f32[8]{0}, f32[4,8]{1,0}) tuple(%f, %k)
}
"""


def test_counts_a_hand_written_module():
    counts = program_compare.hlo_counts(HLO)
    assert counts == {
        "copies": 1,  # the layout copy in ENTRY
        "async_copies": 1,  # a memory-space move, not a layout copy
        "reductions": 1,  # inside the fusion body
        "converts": 3,  # inside the fusion bodies
        "fusions": 2,
        "custom_calls": 2,
        "reductions_unfused": 0,  # %add is a reducer, not a fusion body: its add is no reduce
        "converts_unfused": 1,  # the convert in ENTRY runs as its own kernel
        "convert_only_fusions": 1,  # %cast: the GEMM's FP32 output cast by a kernel of its own
        "gemm_out_f32": 1,
    }


def test_counts_xla_cpu_optimized_hlo():
    # A reduction XLA must keep and a transpose it materializes: the counter sees both in the
    # real optimized text (fusion bodies and the entry computation as XLA prints them).
    def f(x):
        return jnp.sum(jnp.exp(x), axis=1), (x.T * 2.0).astype(jnp.bfloat16)

    compiled = jax.jit(f).lower(jnp.ones((64, 32), jnp.float32)).compile()
    counts = program_compare.hlo_counts(compiled.as_text())
    assert counts["reductions"] + counts["reductions_unfused"] >= 1
    assert counts["fusions"] >= 1
    assert counts["converts"] + counts["converts_unfused"] >= 1


def test_extrapolate_is_linear_in_depth():
    rows = {1: {"flops": 10.0, "copies": 3, "compile_s": 5.0}, 2: {"flops": 14.0, "copies": 5}}
    out = program_compare.extrapolate(rows, 12)
    assert out["flops"] == 10.0 + 11 * 4.0 and out["flops_per_layer"] == 4.0
    assert out["copies"] == 3 + 11 * 2 and "compile_s" not in out


def test_tables_with_every_program_or_some():
    row = {"flops": 2e12, "bytes_accessed": 4e9, "copies": 3}
    result = {
        "config": "gpt2_124m", "precision": "bf16", "chip": "v5e", "depth": 12,
        "method": "extrapolated from 1 and 2 layers", "jax": "0.10.2",
        "shape": {"B": 16, "T": 1024, "V": 50304, "D": 768, "H": 12},
        "programs": {"peer": row, "default": row | {"copies": 6}, "xla": row},
        "per_layer_bytes_ratio": 1.0,
    }  # fmt: skip
    full = program_compare.to_markdown(result)
    assert "| copies outside fusions | 3 | 6 | 2.00 | 3 | 1.00 |" in full
    # --programs=default: its figures, no ratios
    some = program_compare.to_markdown(result | {"programs": {"default": row}})
    assert "| figure | default |" in some and "| copies outside fusions | 3 |" in some


def test_hlo_bytes_per_instruction_add_up_to_xla_total():
    # experiments/hlo_bytes.py cuts each top-level instruction into a module of its own: the
    # parts' bytes accessed add up to the whole program's (no async ops on XLA:CPU).
    import hlo_bytes

    def f(x, w):
        return jnp.tanh(x @ w).sum(axis=0), (x * 2.0).T

    x, w = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 48), jnp.float32)
    compiled = jax.jit(f).lower(x, w).compile()
    total = compiled.cost_analysis()
    total = (total[0] if isinstance(total, list) else total)["bytes accessed"]
    rows = hlo_bytes.instruction_bytes(compiled.as_text())
    assert rows and sum(r[3] for r in rows) == pytest.approx(total, rel=0.05)
