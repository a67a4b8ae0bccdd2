"""Devices, meshes and logical axis rules: the one place in bf16jax that knows about devices.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded, ZeRO-3 / arXiv:1910.02054) and `tensor` (Megatron tensor parallel,
arXiv:1909.08053). Layers name their parameter dimensions logically ("embed", "mlp", ...) via
`nnx.with_partitioning`; `rules` map those names to mesh axes. Invariants: state is created
already sharded (`jax.eval_shape` -> shardings -> `jax.jit(init, out_shardings=...)`), optimizer
moments carry their parameter's sharding, batches are split over ("data", "fsdp"), and a dimension
its mesh axes do not divide is replicated (logged) rather than a crash. Activations are pinned to
the batch sharding at block boundaries (`constrain_batch`): without it GSPMD may contract
FSDP-sharded weights by all-gathering the *batch* instead of the weights, and every device then
holds the whole global batch's activations (found by the TPU AOT compiles: gpt_1b needed 106 GB
per v5e chip; with the constraints, 5.3 GB).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "make_mesh",
    "resolve_rules",
    "logical_to_pspec",
    "logical_to_mesh_sharding",
    "opt_state_shardings",
    "abstract_state",
    "shardings_of",
    "create_sharded",
    "batch_sharding",
    "make_global_batch",
    "constrain_batch",
    "batch_shards",
    "target_platform",
    "maybe_initialize_distributed",
]

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("joined_kv", "tensor"),
    ("kv", None),
    ("layers", None),
    ("relpos_buckets", None),
)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ----------------------------------------------------------------------------- mesh
def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh with Auto axis types.

    Enter it with `jax.set_mesh(mesh)` (`with mesh:` is deprecated). Auto axes give classic
    GSPMD propagation; `jax.make_mesh` defaults to Explicit axes, under which sharding
    constraints become asserts.

    Args:
      mesh_cfg: config (ConfigDict or mapping) with integer `data`, `fsdp`, `tensor`; at most one
        of them may be -1, meaning "all remaining devices".
      devices: devices to use; all of `jax.devices()` by default.

    Returns:
      A `jax.sharding.Mesh` over all given devices.

    Raises:
      ValueError: if a size is invalid or the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [_cfg_get(mesh_cfg, axis, 1) for axis in MESH_AXES]
    shown = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis}={size!r} must be a positive int or -1 (fill).")
    if sizes.count(-1) > 1:
        raise ValueError(f"Mesh sizes ({shown}): only one axis may be -1 (fill); fix the others.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"Mesh sizes ({shown}) cannot fill {n} devices: {n} is not divisible by {known}. "
                f"Choose sizes whose product divides {n}."
            )
        sizes[sizes.index(-1)] = n // known
    elif known != n:
        raise ValueError(
            f"Mesh sizes ({shown}) multiply to {known}, but there are {n} devices: make "
            f"data*fsdp*tensor == {n}, or set one axis to -1 to use the remaining devices."
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        # A subset of devices without a physical topology (or an odd shape): plain order.
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------- rules
def resolve_rules(rules: Sequence[Sequence[Any]] | None = None) -> Rules:
    """Merges `rules` (e.g. `config.mesh.rules`) over `DEFAULT_RULES`, name by name.

    Each rule is `(logical_name, mesh_axes)` where `mesh_axes` is a mesh axis name, a tuple of
    them, or None (replicated). A logical name with no rule at all is replicated.

    Raises:
      ValueError: for a malformed rule or an unknown mesh axis.
    """
    merged = dict(DEFAULT_RULES)
    for rule in rules or ():
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"Sharding rule {rule!r} must be a (logical_name, mesh_axis) pair, e.g. "
                "('embed', 'fsdp') or ('mlp', None)."
            )
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"Sharding rule {rule!r} names mesh axis {axis!r}: use one of {MESH_AXES} "
                    "or None."
                )
        merged[name] = axes
    return tuple(merged.items())


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in names]))


def logical_to_pspec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    where: str = "",
) -> P:
    """Maps logical dimension names to a PartitionSpec via `rules`.

    A name with no rule is replicated; a mesh axis name is kept as is. With `shape` and `mesh`
    given, a dimension not divisible by its mesh axes' size, a mesh axis already used by an
    earlier dimension, or a rank mismatch falls back to replicated (logged), never an error.

    Args:
      names: one logical name (or None) per dimension, e.g. ("embed", "mlp").
      shape: the array's shape, for the divisibility and rank checks.
      mesh: the mesh, for the divisibility check.
      rules: rules as in `resolve_rules` (merged over the defaults; None = defaults).
      where: a label (e.g. the parameter's path) for the log message.

    Returns:
      A PartitionSpec over mesh axes.
    """
    table = dict(resolve_rules(rules))
    if not names:
        return P()
    if shape is not None and len(names) != len(shape):
        log.debug("%s: logical names %s do not fit shape %s: replicated.", where, names, shape)
        return P()
    spec, used = [], set()
    for dim, name in enumerate(names):
        axes = name if name in MESH_AXES else table.get(name)
        if isinstance(axes, tuple) and len(axes) == 1:
            axes = axes[0]
        flat = set(axes if isinstance(axes, tuple) else (axes,))
        size = _axis_size(mesh, axes) if (mesh is not None and axes is not None) else 1
        if axes is not None and flat & used:
            log.info(
                "%s: dim %d (%r) would reuse mesh axes %s: replicated.", where, dim, name, axes
            )
            axes = None
        elif shape is not None and shape[dim] % size:
            level = logging.WARNING if shape[dim] > 1 else logging.DEBUG
            msg = f"dim {dim} ({name!r}, size {shape[dim]}) is not divisible by {axes} ({size})"
            log.log(level, "%s: %s: replicated.", where, msg)
            axes = None
        if axes is not None:
            used |= flat
        spec.append(axes)
    return P(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_to_mesh_sharding(abstract_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for every array in `abstract_state`, from its Variables' logical names.

    Args:
      abstract_state: a pytree (nnx.State, dict, dataclass, optax state, ...) whose leaves are
        arrays or `jax.ShapeDtypeStruct`s, some inside `nnx.Variable`s whose `out_sharding`
        metadata holds logical names (from `nnx.eval_shape`, `jax.eval_shape` or `nnx.split`).
        Optimizer moments built by optax from an nnx.State are such Variables too.
      mesh: the mesh.
      rules: `config.mesh.rules` (merged over DEFAULT_RULES by `resolve_rules`); None = defaults.

    Returns:
      The same tree structure (Variables kept, holding a NamedSharding); leaves outside a
      Variable with logical names (step, PRNG keys, scalars) are replicated.
    """
    rules = resolve_rules(rules)
    replicated = NamedSharding(mesh, P())

    def one(path, x):
        if not _is_variable(x):
            return replicated
        value = x.get_value()
        if not hasattr(value, "shape"):
            return x.replace(jax.tree.map(lambda _: replicated, value))
        names = x.get_metadata().get("out_sharding")
        spec = logical_to_pspec(names, value.shape, mesh, rules, where=jax.tree_util.keystr(path))
        return x.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def opt_state_shardings(opt_state_abstract: Any, param_shardings: Any) -> Any:
    """Shardings for an optimizer state: moments get their parameter's sharding.

    Every subtree of `opt_state_abstract` with the same tree structure as `param_shardings`
    (adam's `mu`/`nu`, sgd's trace, Kahan buffers, ...) takes the parameter shardings leaf by
    leaf; a leaf whose rank does not match its parameter's spec, or whose dims the spec's axes do
    not divide (adafactor's factored row/column statistics, O(rows + cols)), is replicated, as is
    everything else (counts, scales). Needed because `jax.jit(tx.init)` on an Auto mesh
    returns moments replicated, whatever the parameters' sharding.

    Args:
      opt_state_abstract: `jax.eval_shape(tx.init, params)` (or the real state).
      param_shardings: the parameters' NamedShardings (same structure as the params).

    Returns:
      A pytree of NamedSharding with the structure of `opt_state_abstract`.
    """
    p_leaves, p_def = jax.tree.flatten(param_shardings)
    if not p_leaves:
        raise ValueError("param_shardings has no leaves: pass the parameters' NamedShardings.")
    mesh = p_leaves[0].mesh
    replicated = NamedSharding(mesh, P())

    def fit(sharding: NamedSharding, leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        spec = tuple(sharding.spec)
        if len(spec) > len(shape):
            return replicated
        for dim, axes in enumerate(spec):
            if axes is not None and shape[dim] % _axis_size(mesh, axes):
                return replicated
        return sharding

    def visit(node: Any) -> Any:
        if jax.tree.structure(node) == p_def:
            return p_def.unflatten(map(fit, p_leaves, jax.tree.leaves(node)))
        children, node_def = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        if jax.tree_util.treedef_is_leaf(node_def):
            return replicated if children else node
        return node_def.unflatten([visit(c) for c in children])

    return visit(opt_state_abstract)


# ----------------------------------------------------------------------------- sharded init
def abstract_state(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules | None = None) -> Any:
    """`jax.eval_shape(init_fn)` with each leaf's NamedSharding attached.

    NNX eager sharding is turned off while tracing: it would try to use logical names
    ("embed") as mesh axes. The result is the restore target for `Checkpointer` and the input
    to `create_sharded`; leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.

    Args:
      init_fn: builds the state (a pytree: nnx.State, dict, dataclass) from nothing; close over
        config and seeds.
      mesh: the mesh.
      rules: `config.mesh.rules` or None (DEFAULT_RULES).
    """
    with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
        shapes = jax.eval_shape(init_fn)
    shardings = logical_to_mesh_sharding(shapes, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def shardings_of(tree: Any) -> Any:
    """The `.sharding` of every leaf (arrays or sharded ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def create_sharded(init_fn: Callable[[], Any], shardings: Any) -> Any:
    """Runs `init_fn` under `jax.jit(out_shardings=...)`: state is born sharded, never replicated.

    Args:
      init_fn: as for `abstract_state`; it must return the same structure.
      shardings: `abstract_state(init_fn, mesh, rules)` (sharded ShapeDtypeStructs) or a tree
        of NamedSharding (e.g. with `opt_state_shardings` applied to part of it).

    Returns:
      The state, every leaf a `jax.Array` with the given sharding.
    """
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x, jax.ShapeDtypeStruct) else x, shardings
    )
    leaves = jax.tree.leaves(shardings)
    if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
        raise ValueError("create_sharded needs NamedShardings: pass abstract_state(...)'s result.")
    with jax.set_mesh(leaves[0].mesh), nnx.use_eager_sharding(False):
        return jax.jit(init_fn, out_shardings=shardings)()


# ----------------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"); the other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's rows into global, batch-sharded `jax.Array`s.

    Each process passes its own rows (global_batch // process_count of them); the result has
    the global leading dimension, split over ("data", "fsdp").

    Raises:
      ValueError: if an array has no batch axis or the global batch size does not divide
        evenly over data * fsdp.
    """
    sharding = batch_sharding(mesh)
    shards = _axis_size(mesh, BATCH_AXES)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"Batch entry {key!r} is a scalar: every entry needs a batch axis.")
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(
                f"Global batch size {global_rows} (entry {key!r}) is not divisible by "
                f"data*fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']} = {shards}: make "
                f"config.data.batch_size a multiple of {shards} or change the mesh."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins activations `x` [B, ...] to the batch sharding: B over ("data", "fsdp"), the other
    dims left to the compiler (tensor parallelism still splits heads / mlp / vocab).

    Acts only inside `jax.set_mesh` with the bf16jax axes and when the batch axes divide B;
    elsewhere (host-side inference, a model built without a mesh) it returns `x` unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    size = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if size == 1 or x.ndim == 0 or x.shape[0] % size:
        return x
    spec = P(BATCH_AXES, *([P.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_shards() -> int:
    """How many ways the current mesh (`jax.set_mesh`) splits the batch: data * fsdp; 1 without
    a mesh with the bf16jax axes. Read at trace time, e.g. to size per-device chunks."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the current trace compiles for: the mesh's under
    `jax.set_mesh` (an AOT compile for a TPU pod on a CPU host says "tpu"), else the default
    backend. For choices made at trace time that depend on the hardware."""
    mesh = jax.sharding.get_abstract_mesh()
    # An AbstractMesh names its devices' platform through `abstract_device`.
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or getattr(mesh, "platform", None)
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


# ----------------------------------------------------------------------------- multi-host
_MULTIHOST_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _looks_multihost(env: Mapping[str, str]) -> bool:
    if any(env.get(k) for k in _MULTIHOST_VARS):
        return True
    for key in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if len([h for h in env.get(key, "").split(",") if h.strip()]) > 1:
            return True
    # "v4-32", "v5litepod-16": more than 8 cores/chips means more than one host.
    accel = env.get("TPU_ACCELERATOR_TYPE", "")
    tail = accel.rsplit("-", 1)[-1]
    if tail.isdigit() and int(tail) > 8:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 1:
            return True
    return False


def _process_env(env: Mapping[str, str]) -> dict[str, int]:
    """`num_processes` / `process_id` from JAX_NUM_PROCESSES / JAX_PROCESS_ID, where set.

    jax 0.10 reads only JAX_COORDINATOR_ADDRESS (and JAX_LOCAL_DEVICE_IDS) from the environment;
    without a detected cluster it then fails for want of the process count and id.
    """
    out = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = env.get(var, "").strip()
        if not value:
            continue
        if not value.isdigit():
            raise ValueError(f"{var}={value!r} must be a non-negative integer.")
        out[arg] = int(value)
    return out


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` when running on several hosts.

    Call it first, before anything else touches JAX. "auto" initializes on a multi-host Cloud
    TPU slice (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with >1 host, TPU_ACCELERATOR_TYPE
    with >8 cores, MEGASCALE_COORDINATOR_ADDRESS), when JAX_COORDINATOR_ADDRESS is set, or
    under SLURM / Open MPI with >1 task; "yes" always; "no" never (single process). Outside a
    cluster JAX detects (e.g. processes started by hand), set JAX_COORDINATOR_ADDRESS=host:port,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.

    Returns:
      Whether JAX runs distributed (initialized now or before).

    Raises:
      ValueError: for an unknown mode, or a process count / id JAX cannot find.
    """
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.mesh.distributed={mode!r}: use 'auto', 'yes' or 'no'.")
    if mode == "no":
        return False
    if jax.distributed.is_initialized():
        return True
    if mode == "auto" and not _looks_multihost(os.environ):
        return False
    given = _process_env(os.environ)
    try:
        jax.distributed.initialize(**given)
    except ValueError as e:
        raise ValueError(
            f"jax.distributed.initialize: {e} No cluster JAX knows (Cloud TPU, SLURM, Open MPI, "
            "k8s) supplied it: on every process set JAX_COORDINATOR_ADDRESS=host:port (process "
            "0's), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 .. N-1, one per process)."
        ) from e
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}\nmaybe_initialize_distributed must run before any other JAX call "
            "(jax.devices(), creating arrays, ...): call it first thing in main()."
        ) from e
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
