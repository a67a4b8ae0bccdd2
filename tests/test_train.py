"""Tests for bf16jax.training.trainer: mesh invariance, grad accumulation, restore, resume, skipped
steps.

A tiny GPT (1 layer, width 32) in FP32 trains the same batches unsharded, on three meshes and in
micro-batches; all must agree. Compiles dominate the runtime: each expensive setup serves one
test (pytest-xdist would redo a shared one on every worker), and the resume test shares a
persistent compilation cache with the process it resumes in.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import cli_env
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec as P
from tiny import make_mesh, tiny_gpt_config

from bf16jax import config as config_lib
from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.data import datasets as data_lib
from bf16jax.parallel import sharding
from bf16jax.training import loop, optim
from bf16jax.training import trainer as train

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2), "single": (1, 1, 1)}
# The key bias gets a zero gradient in exact arithmetic (softmax ignores a shift q.b_k shared
# by all keys), so Adam turns reduction-order noise into O(lr) steps: not comparable across
# meshes. Every other leaf agrees to ~1e-5 after 4 steps of lr 1e-2 (a wrong step is ~1e-2).
NOISE_ONLY = ("['attn']['k']['bias']",)


def host(tree):
    """A numpy copy (typed PRNG keys as their key data): survives the donation of `tree`."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(leaf, tree)


def assert_trees(a, b, *, exact=False, rtol=1e-5, atol=1e-5, skip=()):
    a, b = host(a), host(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        where = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        if any(s in where for s in skip):
            continue
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=where)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=where)


def assert_same_shardings(tree, shardings):
    assert jax.tree.structure(tree) == jax.tree.structure(shardings)
    got = [x.sharding for x in jax.tree.leaves(tree)]
    assert got == jax.tree.leaves(sharding.shardings_of(shardings))


def adam_moments(state):
    (adam,) = [s for s in state.opt_state.tx_state if isinstance(s, optim.ScaleByAdamState)]
    return adam


def fc1_kernel(params):
    return params["blocks"][0]["mlp"]["fc1"]["kernel"][...]


@dataclasses.dataclass
class Run:
    trainer: train.Trainer
    metrics: list[dict]  # per step, on the host
    params: list  # host copies of the params before step 1 and after every step
    state: train.TrainState  # the final state (never stepped again: it would be donated)


def run_steps(config, shape, batches) -> Run:
    devices = jax.devices()[: int(np.prod(shape))]
    trainer = train.create_trainer(config, make_mesh(shape, devices))
    state = trainer.init_state()
    params, metrics = [host(state.params)], []
    for local in batches:
        state, m = trainer.step(state, trainer.global_batch(local))
        metrics.append(jax.device_get(m))
        params.append(host(state.params))
    return Run(trainer, metrics, params, state)


@pytest.fixture(scope="module")
def batches():
    it = iter(data_lib.make_dataset(tiny_gpt_config().data, "train"))
    return [next(it) for _ in range(STEPS)]


def assert_same_run(run: Run, ref: Run, label: str) -> None:
    for key in ("loss", "grad_norm", "accuracy", "param_norm"):
        np.testing.assert_allclose(
            [m[key] for m in run.metrics],
            [m[key] for m in ref.metrics],
            rtol=1e-5,
            err_msg=f"{label}: {key}",
        )
    assert_trees(run.params[1], ref.params[1], skip=NOISE_ONLY)  # after one step
    assert_trees(run.state.params, ref.state.params, skip=NOISE_ONLY)
    assert_trees(adam_moments(run.state), adam_moments(ref.state), rtol=1e-4, atol=1e-7)
    assert int(run.state.step) == STEPS and int(run.state.opt_state.count) == STEPS, label
    assert int(run.state.skipped) == 0, label


def assert_rule_shardings(run: Run, shape) -> None:
    """Every leaf as `trainer.abstract` says; moments like their param; kernels split by rule."""
    state, mesh = run.state, run.trainer.mesh
    assert_same_shardings(state, run.trainer.abstract)
    adam = adam_moments(state)
    p_leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for moments in (adam.mu, adam.nu):
        for (path, p), m in zip(p_leaves, jax.tree.leaves(moments), strict=True):
            assert m.sharding == p.sharding, (shape, jax.tree_util.keystr(path))
    _, fsdp, tensor = shape
    kernel = fc1_kernel(state.params)  # [embed 32, mlp 64]
    assert kernel.sharding.mesh == mesh and kernel.sharding.spec == P("fsdp", "tensor")
    assert fc1_kernel(adam.mu).sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32 // fsdp, 64 // tensor), shape
    fc2 = state.params["blocks"][0]["mlp"]["fc2"]["kernel"][...]  # [mlp, embed]
    assert fc2.sharding.spec == P("tensor", "fsdp")
    embedding = state.params["embed"]["embedding"][...]  # [vocab, embed]
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (384 // tensor, 32 // fsdp), shape


# ----------------------------------------------------------------------------- sharding
# One test for all the runs: `make test` uses pytest-xdist, which hands tests to workers one by
# one, so a module fixture shared by several tests would be compiled again on each worker.
@pytest.mark.slow
def test_training_is_invariant_to_how_the_batch_is_split(batches):
    """4 FP32 steps unsharded, on three meshes, and in 4 micro-batches: one result."""
    ref = run_steps(tiny_gpt_config(), (1, 1, 1), batches)
    losses = [float(m["loss"]) for m in ref.metrics]
    assert losses[-1] < losses[0] - 0.1, losses  # it trains, so agreement is not trivial
    assert_rule_shardings(ref, (1, 1, 1))
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        run = run_steps(tiny_gpt_config(), shape, batches)
        assert_same_run(run, ref, f"mesh {shape}")
        assert_rule_shardings(run, shape)
    # Gradient accumulation on a sharded mesh. grad_norm is the norm before clipping: it catches
    # a sum (4x) where a mean belongs, which clipped Adam updates would hide.
    accum = run_steps(tiny_gpt_config(grad_accum_steps=4), (2, 2, 2), batches)
    assert_same_run(accum, run, "grad_accum_steps=4")


# ----------------------------------------------------------------------------- restore
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint (step 7) of a fresh (8, 1, 1) state with nonzero Adam moments, with the
    train iterator's position: `workdir/checkpoints/7` as `train_and_evaluate` writes it."""
    config = tiny_gpt_config()
    workdir = tmp_path_factory.mktemp("saved")
    state = train.create_trainer(config, make_mesh((8, 1, 1))).init_state()
    # Elementwise ops keep each leaf's sharding; zero moments would restore "right" by accident.
    mu = jax.tree.map(lambda p: 0.5 * p, state.params)
    nu = jax.tree.map(jnp.square, state.params)
    tx_state = tuple(
        s._replace(mu=mu, nu=nu) if isinstance(s, optim.ScaleByAdamState) else s
        for s in state.opt_state.tx_state
    )
    state = state.replace(
        step=state.step + 7, opt_state=state.opt_state._replace(tx_state=tx_state)
    )
    it = iter(data_lib.make_dataset(config.data, "train"))
    with Checkpointer.from_config(config.checkpoint, workdir / "checkpoints") as ckpt:
        assert ckpt.save(7, state, it, force=True)
    return workdir, state


def test_restore_onto_another_mesh_and_dtype(saved):
    workdir, state = saved
    target = train.create_trainer(tiny_gpt_config(), make_mesh((2, 2, 2))).abstract
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore(7, target)
    assert_trees(restored, state, exact=True)
    assert_same_shardings(restored, target)
    assert fc1_kernel(restored.params).sharding.spec == P("fsdp", "tensor")
    assert fc1_kernel(adam_moments(restored).nu).sharding.spec == P("fsdp", "tensor")
    assert fc1_kernel(restored.params).addressable_shards[0].data.shape == (16, 32)

    # FP32 master weights -> BF16 params for inference; the step and PRNG key are not cast.
    subset = {"params": target.params, "step": target.step, "key": target.key}
    bf16 = ckpt.restore(7, subset, dtype=jnp.bfloat16, partial=True)
    for p, q in zip(jax.tree.leaves(state.params), jax.tree.leaves(bf16["params"]), strict=True):
        assert q.dtype == jnp.bfloat16
        want = np.asarray(p.astype(jnp.bfloat16)).view(np.uint16)  # round to nearest even
        np.testing.assert_array_equal(np.asarray(q).view(np.uint16), want)
    assert bf16["step"].dtype == jnp.int32 and int(bf16["step"]) == 7
    assert bf16["key"].dtype == state.key.dtype
    np.testing.assert_array_equal(jax.random.key_data(bf16["key"]), jax.random.key_data(state.key))
    assert fc1_kernel(bf16["params"]).sharding.spec == P("fsdp", "tensor")


# ----------------------------------------------------------------------------- resume
RESUME_CONFIG = """
from bf16jax.config import base_config


def get_config():
    c = base_config("gpt")
    c.precision = "bf16"
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32)
    c.data.update(seq_len=32, batch_size=16, eval_batch_size=16)
    # The LR must not depend on train.steps: the first run is shorter than the resumed one.
    c.optim.update(learning_rate=1e-2, warmup_steps=2, schedule="constant")
    c.train.update(steps=4, log_every=1, eval_every=100, eval_steps=1)
    c.mesh.update(data=-1, fsdp=2, tensor=2)
    c.checkpoint.update(every_steps=2)
    return c
"""
_TIMING = ("train/step_time_s", "train/tokens_per_s", "train/images_per_s", "train/mfu")


def load_config(path, **train_overrides):
    config = runpy.run_path(str(path))["get_config"]()
    config.train.update(train_overrides)
    config.lock()
    return config


def subprocess_env(**extra):
    return cli_env(8, **extra)


@contextlib.contextmanager
def persistent_compile_cache(path: str):
    """Compiled programs go to (and come from) `path`: the three runs below compile once."""
    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def resume(tmp_path_factory):
    """4 steps straight; 2 steps, then 2 more resumed by `python -m bf16jax.main`."""
    root = tmp_path_factory.mktemp("resume")
    config_path = root / "resume_config.py"
    config_path.write_text(RESUME_CONFIG)
    straight, resumed, cache = root / "straight", root / "resumed", str(root / "jax_cache")
    with persistent_compile_cache(cache):
        loop.train_and_evaluate(load_config(config_path), str(straight))
        first = loop.train_and_evaluate(load_config(config_path, steps=2), str(resumed))
    assert first["step"] == 2
    env = subprocess_env(
        JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    cmd = [sys.executable, "-m", "bf16jax.main", f"--config={config_path}"]
    proc = subprocess.run(
        [*cmd, f"--workdir={resumed}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config_path, straight, resumed, proc


def train_rows(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    steps = [r["step"] for r in logged]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in _TIMING} for r in logged}


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_exact(resume):
    config_path, straight, resumed, proc = resume
    assert "starting at step 2" in proc.stderr
    final = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"final"')))
    assert final["final"]["step"] == 4
    a, b = train_rows(straight), train_rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[3] == b[3] and a[4] == b[4]  # every logged metric, bit for bit
    assert a[3]["train/loss"] != a[4]["train/loss"]
    trainer = train.create_trainer(load_config(config_path))
    states = [
        Checkpointer(Path(w) / "checkpoints").restore(4, trainer.abstract)
        for w in (straight, resumed)
    ]
    assert_trees(states[0], states[1], exact=True)
    assert int(states[1].step) == 4 and int(states[1].opt_state.count) == 4
    first = Checkpointer(Path(resumed) / "checkpoints").restore(2, trainer.abstract)
    assert not np.array_equal(fc1_kernel(host(first.params)), fc1_kernel(host(states[1].params)))


# ----------------------------------------------------------------------------- skipped steps
def poisoned(batch):
    """The batch with one Inf loss weight: every gradient becomes NaN."""
    weights = np.array(batch["weights"])
    weights[0, 0] = np.inf
    return dict(batch, weights=weights)


def test_dynamic_loss_scale_skips_overflow_and_regrows(batches):
    config = tiny_gpt_config(
        "fp16", loss_scale="dynamic", loss_scale_init=2.0**8, loss_scale_period=2
    )
    trainer = train.create_trainer(config, make_mesh((2, 1, 1), jax.devices()[:2]))
    state = trainer.init_state()
    scale0 = 2.0**8

    state, m = trainer.step(state, trainer.global_batch(batches[0]))
    assert float(m["finite"]) == 1.0 and float(m["loss_scale"]) == scale0
    assert int(state.loss_scale.counter) == 1
    before = host((state.params, state.opt_state))
    state, m = trainer.step(state, trainer.global_batch(poisoned(batches[1])))
    assert float(m["finite"]) == 0.0 and int(m["skipped"]) == 1 and int(state.skipped) == 1
    assert_trees((state.params, state.opt_state), before, exact=True)
    assert float(state.loss_scale.scale) == scale0 / 2 and int(state.loss_scale.counter) == 0
    assert int(state.step) == 2 and int(state.opt_state.count) == 1

    state, m = trainer.step(state, trainer.global_batch(batches[1]))
    assert float(m["finite"]) == 1.0 and float(m["loss_scale"]) == scale0 / 2
    assert float(state.loss_scale.scale) == scale0 / 2  # one finite step: not yet
    state, m = trainer.step(state, trainer.global_batch(batches[2]))
    assert float(m["finite"]) == 1.0 and int(m["skipped"]) == 1
    assert float(state.loss_scale.scale) == scale0  # `period` finite steps: grown back
    assert int(state.opt_state.count) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(state.params)))


def test_bf16_skips_non_finite_gradients_and_updates_without_loss_scale(batches):
    trainer = train.create_trainer(tiny_gpt_config("bf16"), make_mesh((2, 1, 1), jax.devices()[:2]))
    state = trainer.init_state()
    before = host((state.params, state.opt_state))
    state, m = trainer.step(state, trainer.global_batch(poisoned(batches[0])))
    assert float(m["finite"]) == 0.0 and int(m["skipped"]) == 1
    assert float(m["applied"]) == 0.0 and int(state.skips_in_a_row) == 1
    assert_trees((state.params, state.opt_state), before, exact=True)
    assert float(state.loss_scale.scale) == 1.0
    assert fc1_kernel(state.params).dtype == jnp.float32  # bf16 policy: FP32 master weights
    state, m = trainer.step(state, trainer.global_batch(batches[0]))
    assert float(m["finite"]) == 1.0 and int(m["skipped"]) == 1
    assert int(state.skips_in_a_row) == 0 and int(m["skips_in_a_row"]) == 0
    assert not np.array_equal(fc1_kernel(host(state.params)), fc1_kernel(before[0]))

    # Finite gradients, but an update that overflows: first moments near the FP32 maximum make
    # Adam's bias-corrected m / (sqrt(v) + eps) infinite. Skipped like a non-finite gradient.
    adam = adam_moments(state)
    huge = adam._replace(mu=jax.tree.map(lambda x: jnp.full_like(x, 3e38), adam.mu))
    tx_state = tuple(huge if s is adam else s for s in state.opt_state.tx_state)
    state = state.replace(opt_state=state.opt_state._replace(tx_state=tx_state))
    before = host((state.params, state.opt_state))
    state, m = trainer.step(state, trainer.global_batch(batches[1]))
    assert float(m["finite"]) == 1.0 and float(m["applied"]) == 0.0
    assert int(m["skipped"]) == 2 and int(state.skips_in_a_row) == 1
    assert_trees((state.params, state.opt_state), before, exact=True)


# ----------------------------------------------------------------------------- bad input
def test_bad_policy_and_mesh():
    c = config_lib.base_config("gpt")
    c.precision = "bf61"
    with pytest.raises(ValueError, match="config.precision.*'bf61'"):
        train.create_trainer(c)
    c = config_lib.base_config("gpt")
    c.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="multiply to 3, but there are 8 devices"):
        train.create_trainer(c)
    with pytest.raises(ValueError, match="multiply to 16, but there are 8 devices"):
        make_mesh((2, 4, 2))


def test_batch_not_divisible_by_data_times_fsdp(batches):
    trainer = train.create_trainer(tiny_gpt_config(), make_mesh((2, 4, 1)))
    local = {k: v[:12] for k, v in batches[0].items()}
    with pytest.raises(ValueError, match=r"batch size 12 .*data\*fsdp = 2\*4 = 8"):
        trainer.global_batch(local)


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "workdir"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        loop.train_and_evaluate(tiny_gpt_config(), str(path))
    assert path.read_text() == "keep me"


def snapshot(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def test_checkpoint_of_another_model_is_refused_and_kept(saved, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved[0] / "checkpoints", workdir / "checkpoints")
    before = snapshot(workdir / "checkpoints")
    config = tiny_gpt_config()
    config.model.update(embed_dim=64, mlp_dim=128)
    with pytest.raises(ValueError, match=r"shape .*the configs differ"):
        loop.train_and_evaluate(config, str(workdir))
    assert snapshot(workdir / "checkpoints") == before
    assert os.listdir(workdir / "checkpoints") == ["7"]
    assert os.listdir(workdir) == ["checkpoints"]  # no metrics or event files either


def test_sigterm_saves_the_current_step_stops_and_resumes(tmp_path, monkeypatch):
    """A real SIGTERM during step 2 (delivered to this process): step 2 is finished, saved and
    committed; the run returns `preempted`; rerun, it resumes at step 2 and logs each step once."""
    config = tiny_gpt_config(steps=5)  # periodic saves: every 250 steps
    real_step, calls = train.Trainer.step, []

    def step(self, state, batch, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, state, batch, **kwargs)

    monkeypatch.setattr(train.Trainer, "step", step)
    handler = signal.getsignal(signal.SIGTERM)
    workdir = tmp_path / "run"
    with persistent_compile_cache(str(tmp_path / "jax_cache")):  # the rerun compiles nothing
        result = loop.train_and_evaluate(config, str(workdir))
        assert result["preempted"] is True and result["step"] == 2
        assert Checkpointer(workdir / "checkpoints").all_steps() == [2]
        assert signal.getsignal(signal.SIGTERM) is handler  # the handler is put back
        monkeypatch.undo()
        resumed = loop.train_and_evaluate(config, str(workdir))
    assert resumed["step"] == 5 and "preempted" not in resumed
    assert sorted(train_rows(workdir)) == [1, 2, 3, 4, 5]


def test_rollback_skips_the_data_of_a_non_finite_window(tmp_path, monkeypatch, caplog):
    """Batches 4-6 are poisoned: steps 4-6 are skipped; at 3 in a row the run rolls back to the
    checkpoint of step 2 and goes on with the data after batch 6 (or 7, fetched ahead), as large
    runs do after a loss spike. Without rollbacks left it stops with TrainingDiverged."""
    config = tiny_gpt_config(
        steps=7, max_skips_in_a_row=3, nonfinite_rollbacks=1, eval_every=100, drift_every=-1
    )
    config.unlock()
    config.checkpoint.every_steps = 2
    config.lock()
    real_batch, fetched = train.Trainer.global_batch, []

    def global_batch(self, local):
        fetched.append(1)
        return real_batch(self, poisoned(local) if 4 <= len(fetched) <= 6 else local)

    monkeypatch.setattr(train.Trainer, "global_batch", global_batch)
    workdir = tmp_path / "run"
    with persistent_compile_cache(str(tmp_path / "jax_cache")):  # the 2nd run compiles nothing
        result = loop.train_and_evaluate(config, str(workdir))
        assert result["step"] == 7 and result["skipped"] == 0
        assert "Rollback 1 of 1: steps 4-6 were skipped (non-finite); restored step 2" in (
            caplog.text
        )
        assert sorted(train_rows(workdir)) == list(range(1, 8))  # each step once
        quarantined = sorted(os.listdir(workdir / "checkpoints" / ".quarantine"))
        assert quarantined == ["4.rolled-back", "6.rolled-back"]
        # Batches 1-7 before the rollback at step 6 (7 fetched ahead), 8-11 after, 1 to evaluate.
        assert len(fetched) == 12
        fetched.clear()
        no_rollback = with_train(config, nonfinite_rollbacks=0)
        with pytest.raises(loop.TrainingDiverged, match=r"steps 4-6: 3 steps in a row.* step 2 "):
            loop.train_and_evaluate(no_rollback, str(tmp_path / "no_rollback"))


def with_train(config, **train):
    config = config.copy_and_resolve_references()
    config.unlock()
    config.train.update(train)
    config.lock()
    return config


def test_drift_check_can_be_turned_off(tmp_path):
    config = tiny_gpt_config("bf16", steps=2, drift_every=-1)
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert "eval_loss" in result and not any(k.startswith("drift") for k in result)
    bad = tiny_gpt_config("bf16", drift_every=-2)
    with pytest.raises(ValueError, match="drift_every=-2.*-1 \\(off\\)"):
        config_lib.validate(bad)


# ----------------------------------------------------------------------------- issue 13
@pytest.fixture(scope="module")
def fp16_run():
    """A tiny fp16 GPT with a static loss scale of 2^15 and the diagnostics on: one compile."""
    config = tiny_gpt_config("fp16", loss_scale="static", loss_scale_init=32768.0, diagnostics=True)
    trainer = train.create_trainer(config, make_mesh(MESHES["single"], jax.devices()[:1]))
    batch = next(iter(data_lib.make_dataset(config.data, "train")))
    return trainer, batch


def test_grad_subnormal_is_measured_on_the_scaled_16bit_gradients(fp16_run):
    """Before: `grad/subnormal` read the unscaled FP32 gradients (measured: 3.9% 'subnormal'
    where the loss-scaled FP16 values the backward produced had none)."""
    from flax import nnx

    from bf16jax.nn.loss import model_loss

    trainer, local = fp16_run
    batch = trainer.global_batch(local)
    state = trainer.init_state()
    params = jax.tree.map(jnp.copy, state.params)

    def loss(p, scale):  # the step's own loss (fused or not), times the loss scale
        model = nnx.merge(trainer.graphdef, p, state.fp8_meta)
        return model_loss(model, batch, trainer.loss, grad_scale=scale)[0] * scale

    tiny = float(jnp.finfo(jnp.float16).tiny)

    def subnormal(scale):
        grads = jax.tree.leaves(jax.jit(jax.grad(loss))(params, scale))
        sub = sum(float(jnp.sum((jnp.abs(g) > 0) & (jnp.abs(g) < tiny))) for g in grads)
        return sub / sum(g.size for g in grads)

    scaled, unscaled = subnormal(32768.0), subnormal(1.0)
    _, metrics = trainer.step(state, batch, diagnostics=True)  # the logging steps' variant
    assert float(metrics["grad/subnormal"]) == pytest.approx(scaled, abs=1e-6)
    assert unscaled > scaled + 0.01  # what the metric used to report


def test_out_of_range_targets_skip_the_step_and_stop_the_loop(fp16_run):
    trainer, local = fp16_run
    bad = dict(local, targets=np.asarray(local["targets"]).copy())
    bad["targets"][0, 3] = -1  # used to wrap to the last byte
    state = trainer.init_state()
    before = host(state.params)
    state, metrics = trainer.step(state, trainer.global_batch(bad))
    metrics = jax.device_get(metrics)
    assert metrics["invalid_targets"] == 1.0 and np.isnan(metrics["loss"])
    assert int(metrics["skipped"]) == 1
    assert_trees(state.params, before, exact=True)
    with pytest.raises(ValueError, match=r"Step 7: 1 training target\(s\) outside"):
        loop._check_targets(metrics, 7, trainer.config)
