"""Tests for bf16jax.checkpoint.manager: bit-exact round trips, other meshes, dtype casts, bad
dirs."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bf16jax.checkpoint import integrity
from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.parallel import sharding
from bf16jax.precision import get_policy


class Dense(nnx.Module):
    def __init__(self, din, dout, names, *, rngs):
        init = nnx.with_partitioning(nnx.initializers.normal(1.0), names)
        self.kernel = nnx.Param(init(rngs.params(), (din, dout)))
        self.bias = nnx.Param(jnp.zeros((dout,)))


class Tiny(nnx.Module):
    def __init__(self, *, rngs, width=16):
        self.up = Dense(8, width, ("embed", "mlp"), rngs=rngs)
        self.down = Dense(width, 8, ("mlp", "embed"), rngs=rngs)


TX = optax.adam(1e-2)


def make_init(seed=0, width=16):
    def init():
        params = nnx.state(Tiny(rngs=nnx.Rngs(seed), width=width), nnx.Param)
        return {
            "params": params,
            "opt": TX.init(params),
            "step": jnp.asarray(seed, jnp.int32),
            "key": jax.random.key(seed),  # typed PRNG key
            "raw_key": jax.random.PRNGKey(seed + 1),  # raw uint32[2] key
        }

    return init


def mesh_of(data, fsdp, tensor, devices=None):
    return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, devices)


def dataset_iter():
    ds = grain.MapDataset.source(np.arange(64)).shuffle(seed=0).batch(4, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint (step 3) written on a (8, 1, 1) mesh, with an advanced grain iterator."""
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    mesh = mesh_of(8, 1, 1)
    init = make_init(seed=3)
    state = sharding.create_sharded(init, sharding.abstract_state(init, mesh))
    state = jax.tree.map(lambda x: x, state)
    it = dataset_iter()
    next(it), next(it)
    with Checkpointer(directory, async_save=True) as ckpt:
        assert ckpt.save(3, state, it)
        expected_next = next(it)  # the iterator may move on while the save runs
        ckpt.wait()
        assert ckpt.latest_step() == 3
    return directory, state, expected_next


def test_round_trip_is_bit_exact_with_keys_and_iterator(saved):
    directory, state, expected_next = saved
    mesh = mesh_of(8, 1, 1)
    target = sharding.abstract_state(make_init(), mesh)
    it = dataset_iter()
    ckpt = Checkpointer(directory)
    restored, step = ckpt.restore_or_init(target, lambda: pytest.fail("must not init"), it)
    assert step == 3
    assert_same(restored, state)
    assert isinstance(restored["params"]["up"]["kernel"], nnx.Param)
    assert restored["params"]["up"]["kernel"].get_metadata()["out_sharding"] == ("embed", "mlp")
    assert jax.tree.map(lambda x: x.sharding, restored) == sharding.shardings_of(target)
    assert type(restored["opt"][0]) is type(state["opt"][0])  # NamedTuple, not a list
    np.testing.assert_array_equal(next(it), expected_next)


@pytest.mark.parametrize("shape", [(2, 2, 2), "single"])
def test_restore_onto_another_mesh(saved, shape):
    directory, state, _ = saved
    mesh = mesh_of(1, 1, 1, jax.devices()[:1]) if shape == "single" else mesh_of(*shape)
    target = sharding.abstract_state(make_init(), mesh)
    restored = Checkpointer(directory).restore(3, target)
    assert_same(restored, state)
    kernel = restored["opt"][0].mu["up"]["kernel"][...]
    assert kernel.sharding == target["opt"][0].mu["up"]["kernel"].get_value().sharding
    if shape != "single":
        assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    else:
        assert len(kernel.sharding.device_set) == 1


def test_dtype_converting_restore(saved):
    directory, state, _ = saved
    target = sharding.abstract_state(make_init(), mesh_of(2, 2, 2))
    ckpt = Checkpointer(directory)
    for dtype in (jnp.bfloat16, get_policy("bf16-pure")):
        restored = ckpt.restore(3, target, dtype=dtype)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
            if jnp.issubdtype(a.dtype, jnp.floating):
                assert b.dtype == jnp.bfloat16
                want = np.asarray(a.astype(jnp.bfloat16)).view(np.uint16)  # round to nearest even
                np.testing.assert_array_equal(np.asarray(b).view(np.uint16), want)
        assert_same(
            {k: restored[k] for k in ("step", "key", "raw_key")},
            {k: state[k] for k in ("step", "key", "raw_key")},
        )
    # Params only (inference): the rest of the checkpoint is not read into memory.
    params_bf16 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
        {"params": target["params"]},
    )
    only = ckpt.restore(3, params_bf16, partial=True)
    assert jax.tree.structure(only) == jax.tree.structure(params_bf16)
    np.testing.assert_array_equal(
        np.asarray(only["params"]["down"]["kernel"][...]),
        np.asarray(state["params"]["down"]["kernel"][...].astype(jnp.bfloat16)),
    )
    with pytest.raises(ValueError, match="checkpoint leaves not in the target: key, opt/0/count"):
        ckpt.restore(3, params_bf16)


def test_mismatched_targets_raise_naming_the_leaf(saved):
    directory, _, _ = saved
    mesh = mesh_of(8, 1, 1)
    ckpt = Checkpointer(directory)
    wider = sharding.abstract_state(make_init(width=32), mesh)
    with pytest.raises(ValueError, match=r"'opt/0/mu/down/kernel/value'.*\(16, 8\).*\(32, 8\)"):
        ckpt.restore(3, wider)
    target = sharding.abstract_state(make_init(), mesh)
    as_float = dict(
        target, step=jax.ShapeDtypeStruct((), jnp.float32, sharding=target["step"].sharding)
    )
    with pytest.raises(ValueError, match=r"'step'.*int32.*float32"):
        ckpt.restore(3, as_float)
    with pytest.raises(ValueError, match=r"'step' has no sharding"):
        ckpt.restore(3, dict(target, step=jax.ShapeDtypeStruct((), jnp.int32)))
    # Another config (an extra entry): restore_or_init raises instead of re-initializing.
    other = dict(target, extra=target["step"])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: extra.*fresh checkpoint"):
        ckpt.restore_or_init(other, lambda: pytest.fail("must not init"))
    assert ckpt.all_steps() == [3]


def test_missing_step_and_missing_data_item(saved, tmp_path):
    directory, state, _ = saved
    target = sharding.abstract_state(make_init(), mesh_of(8, 1, 1))
    with pytest.raises(
        ValueError, match=r"No committed checkpoint for step 7 .*available steps: \[3\]"
    ):
        Checkpointer(directory).restore(7, target)
    ckpt = Checkpointer(tmp_path / "nodata", async_save=False)
    assert ckpt.save(1, state)
    with pytest.raises(ValueError, match="no data-iterator state"):
        ckpt.restore(1, target, dataset_iter())
    assert_same(ckpt.restore(1, target), state)


def test_bad_directories(tmp_path, saved):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Checkpointer(afile)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not checkpoint steps: notes.txt.*nothing was changed"):
        Checkpointer(junk)
    assert (junk / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="does not exist"):
        Checkpointer(tmp_path / "missing", create=False)
    foreign = tmp_path / "foreign"
    shutil.copytree(saved[0], foreign)
    shutil.rmtree(foreign / "3" / "state")
    (foreign / "3" / "default").mkdir()
    with pytest.raises(ValueError, match=r"3 is not a bf16jax checkpoint.*'default'"):
        Checkpointer(foreign)


def test_unfinished_saves_are_moved_aside_at_start_up(saved, tmp_path, caplog):
    directory = tmp_path / "run"
    shutil.copytree(saved[0], directory)
    shutil.copytree(directory / "3", directory / "9.orbax-checkpoint-tmp-1234")  # crashed save
    shutil.copytree(directory / "3", directory / "11")
    os.remove(directory / "11" / "commit_success.txt")  # never committed (object stores)
    ckpt = Checkpointer(directory)
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
    with pytest.raises(ValueError, match="never committed"):
        ckpt.save(11, saved[1], force=True)  # in the way of a save, before start-up
    target = sharding.abstract_state(make_init(), mesh_of(8, 1, 1))
    _, step = ckpt.restore_or_init(target, lambda: pytest.fail("must not init"))
    assert step == 3
    assert sorted(os.listdir(directory)) == [".quarantine", "3"]
    assert sorted(os.listdir(directory / ".quarantine")) == [
        "11.unfinished",
        "9.orbax-checkpoint-tmp-1234.unfinished",
    ]
    assert "11 was never committed (an interrupted save): moved to" in caplog.text
    assert ckpt.save(11, saved[1], force=True)  # no longer in the way
    ckpt.close()


def test_save_schedule_no_overwrite_and_init(tmp_path):
    mesh = mesh_of(8, 1, 1)
    init = make_init(seed=5)
    target = sharding.abstract_state(init, mesh)
    ckpt = Checkpointer(tmp_path / "run", max_to_keep=2, save_interval_steps=2, async_save=True)
    state, step = ckpt.restore_or_init(target, lambda: sharding.create_sharded(init, target))
    assert step == 0 and ckpt.latest_step() is None
    assert not ckpt.save(1, state)  # not due
    assert ckpt.save(2, state) and ckpt.save(4, state) and ckpt.save(5, state, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]  # max_to_keep
    changed = dict(state, step=jnp.asarray(99, jnp.int32))
    assert not ckpt.save(5, changed, force=True)  # already saved: left alone
    ckpt.close()
    restored = Checkpointer(tmp_path / "run").restore(5, target)
    assert int(restored["step"]) == 5
    with pytest.raises(ValueError, match="save_interval_steps=-1"):
        Checkpointer(tmp_path / "other", save_interval_steps=-1)


# ----------------------------------------------------------------------------- integrity
def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_files(step_dir):
    """A step's array-data files (OCDBT's `d/` files: some hold the tree, some the arrays)."""
    return sorted(p for p in (step_dir / "state").rglob("d/*") if p.is_file())


def _with_nan(state):
    def poison(x):
        return x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x

    return dict(state, params=jax.tree.map(poison, state["params"]))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, saved):
    """Steps 3 and 5 of one run (5 = 3 with its step counter moved on)."""
    directory = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(saved[0], directory)
    state5 = dict(saved[1], step=jnp.asarray(5, jnp.int32))
    with Checkpointer(directory) as ckpt:
        assert ckpt.save(5, state5, dataset_iter())
    return directory, saved[1], state5


@pytest.mark.parametrize(
    "damage",
    [
        "flip",
        "truncate",
        "delete",
        "data-position",
        "manifest",
        "manifest-field",
        "no-manifest",
        "array-metadata",
    ],
)
def test_damaged_newest_falls_back_to_one_that_verifies(two_steps, tmp_path, caplog, damage):
    src, state3, _ = two_steps
    directory = tmp_path / "run"
    shutil.copytree(src, directory)
    step5 = directory / "5"
    for path in _data_files(step5) if damage in ("flip", "truncate", "delete") else ():
        if damage == "flip":
            _flip(path)
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.unlink()
    if damage == "data-position":  # valid JSON, another position
        pos = step5 / "data" / "process_0-of-1.json"
        position = json.loads(pos.read_text())
        key = next(k for k, v in position.items() if isinstance(v, int))
        pos.write_text(json.dumps({**position, key: position[key] + 1}, indent=4))
    if damage == "manifest":
        _flip(step5 / "manifest" / "metadata", 20)
    if damage == "manifest-field":  # still JSON, a leaf's "dtype" renamed: damage, no KeyError
        meta = step5 / "manifest" / "metadata"
        meta.write_text(meta.read_text().replace('"dtype"', '"dthpe"', 1))
    if damage == "no-manifest":  # every checkpoint is saved with one: never "restore unverified"
        shutil.rmtree(step5 / "manifest")
    if damage == "array-metadata":  # without it Orbax reads the PRNG keys back as uint32 words
        (step5 / "state" / "array_metadatas" / "process_0").unlink()
    target = sharding.abstract_state(make_init(), mesh_of(8, 1, 1))
    it = dataset_iter()
    ckpt = Checkpointer(directory)
    restored, step = ckpt.restore_or_init(target, lambda: pytest.fail("must not init"), it)
    assert step == 3
    assert_same(restored, state3)
    assert f"checkpoint step 5 in {directory}/5 is damaged" in caplog.text
    assert f"moved to {directory}/.quarantine/5.damaged. Resumed from step 3" in caplog.text
    assert sorted(os.listdir(directory)) == [".quarantine", "3"]
    ckpt.close()


def test_no_checkpoint_that_verifies_is_refused_and_left_alone(two_steps, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(two_steps[0], directory)
    for step in ("3", "5"):
        for path in _data_files(directory / step):
            _flip(path)
    before = sorted(str(p) for p in directory.rglob("*"))
    target = sharding.abstract_state(make_init(), mesh_of(8, 1, 1))
    with pytest.raises(ValueError, match=r"No checkpoint in .* verifies: step 5 \(damaged: .*\), "
                       r"3 \(damaged: .*Nothing was moved or deleted"):  # fmt: skip
        Checkpointer(directory).restore_or_init(target, lambda: pytest.fail("must not init"))
    assert sorted(str(p) for p in directory.rglob("*")) == before


def test_non_finite_checkpoint_is_skipped_and_retention_keeps_the_last_good(saved, tmp_path):
    state = saved[1]
    bad = _with_nan(state)
    ckpt = Checkpointer(tmp_path / "run", max_to_keep=1, async_save=True)
    assert ckpt.save(2, state) and ckpt.save(4, state, healthy=False)
    ckpt.wait()
    assert ckpt.manifest(4)["healthy"] is False and ckpt.all_steps() == [2, 4]
    assert ckpt.save(6, bad)
    ckpt.wait()
    assert ckpt.manifest(6)["finite"] is False
    # max_to_keep=1 keeps 6, and 2: the newest finite, healthy one; 4 goes.
    assert ckpt.all_steps() == [2, 6]
    target = sharding.abstract_state(make_init(), mesh_of(8, 1, 1))
    restored, step = Checkpointer(tmp_path / "run").restore_or_init(target, pytest.fail)
    assert step == 2
    assert_same(restored, state)
    assert os.listdir(tmp_path / "run" / ".quarantine") == ["6.non-finite"]
    assert ckpt.save(8, state)
    ckpt.close()
    assert Checkpointer(tmp_path / "run").all_steps() == [8]


def test_a_save_is_read_back_before_older_ones_are_deleted(saved, tmp_path, caplog):
    state = saved[1]
    ckpt = Checkpointer(tmp_path / "run", max_to_keep=1, async_save=True)
    assert ckpt.save(2, state)
    ckpt.wait()
    assert ckpt.save(4, state)
    ckpt._manager.wait_until_finished()  # committed, not yet read back
    for path in _data_files(tmp_path / "run" / "4"):
        _flip(path)
    ckpt.wait()
    assert "Checkpoint step 4 did not read back as saved (ValueError: DATA_LOSS" in caplog.text
    assert ckpt.all_steps() == [2]  # the good one is kept; the bad one quarantined
    assert os.listdir(tmp_path / "run" / ".quarantine") == ["4.damaged"]
    ckpt.close()


def test_an_interrupted_wait_does_not_report_a_committed_save_as_failed(saved, tmp_path, caplog):
    """A second SIGINT lands in the wait for a forced save: Orbax's finalize thread goes on and
    commits, but a later wait may return before it has. Simulated: the first wait raises
    KeyboardInterrupt, the next returns at once while the commit is 0.5 s away."""
    import time

    ckpt = Checkpointer(tmp_path / "run", async_save=True)
    manager = ckpt._manager
    real_wait, real_finalize = manager.wait_until_finished, manager._finalize_checkpoint
    mode = ["real"]  # Orbax's own calls (save waits for the previous one) are real waits

    def wait():
        if mode[0] == "interrupt":  # the second SIGINT lands in the wait
            mode[0] = "early"
            raise KeyboardInterrupt("second SIGINT")
        if mode[0] == "early":  # the next wait returns before the finalize thread commits
            mode[0] = "real"
            return
        real_wait()

    def slow_finalize(step):
        time.sleep(0.5)
        real_finalize(step)

    manager.wait_until_finished = wait
    manager._finalize_checkpoint = slow_finalize
    assert ckpt.save(2, saved[1])
    mode[0] = "interrupt"
    with pytest.raises(KeyboardInterrupt):
        ckpt.wait()
    ckpt.close()  # settles while the commit is still being written
    assert "did not commit" not in caplog.text
    assert "step 2 in" in caplog.text and "still being written when interrupted" in caplog.text
    real_wait()
    assert Checkpointer(tmp_path / "run").all_steps() == [2]


def test_batched_checksums_equal_the_per_leaf_ones_on_a_sharded_state(saved):
    """One program over all the leaves (accelerators) and one per leaf (XLA:CPU) give the same
    digits and finite flags, on leaves sharded over the 8 fake devices, as NumPy does on the
    host and as the manifest that the `saved` checkpoint was written with."""
    directory, saved_state, _ = saved
    mesh = mesh_of(1, 4, 2)
    init = make_init(seed=3)
    state = sharding.create_sharded(init, sharding.abstract_state(init, mesh))
    kernel = state["opt"][0].mu["up"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    half = jax.device_put(jnp.arange(24, dtype=jnp.bfloat16).reshape(4, 6), kernel.sharding)
    odd = {"half": half, "nan": half.astype(jnp.float32) * jnp.nan, "flag": jnp.ones(3, bool)}
    per_leaf = integrity.checksums(dict(state, odd=odd), batched=False)
    batched = integrity.checksums(dict(state, odd=odd), batched=True)
    assert batched == per_leaf
    assert [p for p, s in batched.items() if not s["finite"]] == ["odd/nan"]
    for path, x in integrity.flat_leaves(dict(state, odd=odd)).items():
        bits = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        assert batched[path]["checksum"] == integrity.host_checksum(np.asarray(bits)), path
    manifest = Checkpointer(directory).manifest(3)
    assert {p: s["checksum"] for p, s in integrity.checksums(state, batched=True).items()} == {
        p: leaf["checksum"] for p, leaf in manifest["leaves"].items()
    }
