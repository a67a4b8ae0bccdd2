"""Test setup, fixed before JAX starts: 8 fake CPU devices, strict dtype promotion, and two
things that make the suite's thousands of XLA compiles cheaper without changing what is tested.

- XLA:CPU flags that make compiling cheaper (tests/cli_runs.py FAST_COMPILE_FLAGS): the
  suite's time is compiling tiny programs, not running them.
  - LLVM at -O0 (`--xla_backend_optimization_level=0`, as experiments/aot_tpu.py's
    FAST_CPU_COMPILE). Measured: the tiny GPT train step compiles in 4.4-5.5 CPU s instead of
    7.0-8.6; test_train + test_models + test_numerics took 234 CPU s with this and the cache
    below, 383 with the cache alone, 405 with neither.
  - XLA's classic elemental emitters instead of its MLIR fusion emitters
    (`--xla_cpu_use_fusion_emitters=false`) and one LLVM module per program
    (`--xla_cpu_parallel_codegen_split_count=1`): the tiny GPT train step's backend compile
    took 2.3-2.9 CPU s at -O0, 0.76-1.02 s without the fusion emitters and 0.53-0.84 s with
    one module too. The fusion emitters alone took the suite's in-process compile time from
    817 s to 589 s.
  XLA's HLO passes, and so the program, are unchanged; only the machine code differs, and
  floating-point results may differ in the last bit, so every subprocess a test starts gets the
  same flags (tests/cli_runs.py `cli_env`). tests/test_compile_flags.py checks that tiny FP32
  and BF16 runs under these flags and under XLA's defaults agree.
- One persistent compilation cache per pytest run, made by the first process (the xdist
  controller) and inherited through the environment by the workers and every subprocess (CLI
  runs, notebook kernels, the study): a program that several tests or processes build compiles
  once. It is deleted at the end, so every run starts cold, as CI does.

BF16JAX_TEST_FAST_COMPILE=0 keeps XLA's default compile flags (test_compile_flags then skips);
BF16JAX_TEST_XLA_CACHE=0 turns the cache off; a JAX_COMPILATION_CACHE_DIR already set is used as
is and kept.
"""

import os
import shutil
import tempfile

from cli_runs import FAST_COMPILE_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any("xla_force_host_platform_device_count" in f for f in _flags):
    _flags.append("--xla_force_host_platform_device_count=8")
if os.environ.get("BF16JAX_TEST_FAST_COMPILE", "1") != "0":
    for _flag in FAST_COMPILE_FLAGS:
        if not any(f.startswith(_flag.split("=")[0]) for f in _flags):
            _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)

_OWNED_CACHE = None
if os.environ.get("BF16JAX_TEST_XLA_CACHE", "1") != "0":
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _OWNED_CACHE = tempfile.mkdtemp(prefix="bf16jax-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWNED_CACHE
    # Cache every program, however fast it compiled, and never evict: with a size bound JAX's
    # cache takes a file lock around every read and write and rescans the whole directory at
    # every write (jax/_src/lru_cache.py), quadratic in the suite's thousands of programs:
    # test_loss + test_layers took 51 CPU s with a 4 GiB bound, 33 without. Without the lock,
    # a process may read an entry another is still writing: JAX then fails to decompress it,
    # warns and compiles the program itself.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

POLICIES = ("fp32", "bf16", "bf16-pure")


def _module(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    # The modules with a test marked slow (CLI runs, notebooks, the docs) first, each module's
    # tests together, in collection order otherwise: xdist hands out whole modules in this
    # order (pyproject's --dist loadfile), so no long one is left to run alone at the end.
    slow = {_module(item) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: _module(item) not in slow)
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    if _OWNED_CACHE is not None:
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)
