"""The Trainer: a config made into a sharded, jitted train / eval / predict program.

`create_trainer(config)` builds the model's graphdef for the policy and the mesh's platform (the
attention kernel is chosen there), the optimizer and the loss choice (`config.train.loss_impl`,
`loss.LossOptions`), and a `Trainer` whose state is built sharded (eval_shape -> shardings ->
jit). The pure steps it jits live in `bf16jax.training.step` (re-exported here): the Trainer jits
variants of the train step with the same shardings and donation: the plain one, which the loop
runs on the steps that do not log, and one that adds the param norm and the per-step diagnostics
(`train.diagnostics`), which it runs on logging steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bf16jax import config as config_lib
from bf16jax.data import datasets as data_lib
from bf16jax.data import mixture as mixture_lib
from bf16jax.evaluation import heldout as evaluation
from bf16jax.models import build_model, param_count
from bf16jax.nn import loss as loss_lib
from bf16jax.nn.layers import Attention
from bf16jax.nn.loss import LossOptions
from bf16jax.nn.quant import FP8Meta
from bf16jax.parallel import sharding
from bf16jax.precision import Policy, fp32_reference, get_policy, record_paths
from bf16jax.precision import loss_scale as ls
from bf16jax.precision.overrides import describe_rule_hits
from bf16jax.training import optim
from bf16jax.training.step import (  # re-exported: the Trainer's pure steps
    _DEFAULT_LOSS,
    _KEY_SALT,
    DIAGNOSTICS_SCOPE,
    TrainState,
    _merge,
    eval_step,
    predict_step,
    shadow_fp32_step,
    train_step,
)

__all__ = [
    "TrainState",
    "DIAGNOSTICS_SCOPE",
    "Trainer",
    "create_trainer",
    "train_step",
    "eval_step",
    "predict_step",
    "shadow_fp32_step",
]

log = logging.getLogger(__name__)
_F32 = jnp.float32


@dataclasses.dataclass
class Trainer:
    """The static half of training: config, policy, mesh, model graphdef, optimizer, shardings.

    Build with `create_trainer`; then `init_state()`, `step(state, batch)` (jitted, state
    donated) and `evaluate(state)`.
    """

    config: ml_collections.ConfigDict
    policy: Policy
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    fp32_graphdef: nnx.GraphDef  # the same model under the fp32 policy (drift diagnostic)
    diag_graphdef: nnx.GraphDef  # the run's model with attention-logit tracking on
    optimizer: optim.Optimizer
    abstract: TrainState  # sharded ShapeDtypeStructs: the restore target
    n_params: int
    loss: LossOptions = _DEFAULT_LOSS  # from config.train (loss_impl "auto" decided)

    def _init(self, params=None) -> TrainState:
        cfg = self.config
        model = build_model(
            cfg.model,
            self.policy,
            rngs=nnx.Rngs(cfg.seed),
            platform=self.mesh.devices.flat[0].platform,
        )
        if params is None:
            params = nnx.state(model, nnx.Param)
        fp8_meta = nnx.state(model, FP8Meta)  # empty State unless q=fp8
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
            loss_scale=ls.make_loss_scale(cfg.train),
            key=jax.random.fold_in(jax.random.key(cfg.seed), _KEY_SALT),
            skipped=jnp.zeros([], jnp.int32),
            skips_in_a_row=jnp.zeros([], jnp.int32),
            fp8_meta=fp8_meta,
        )

    @property
    def state_shardings(self):
        return sharding.shardings_of(self.abstract)

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings."""
        return sharding.create_sharded(self._init, self.abstract)

    def init_state_from(self, directory: str) -> TrainState:
        """A fresh state (step 0, fresh optimizer state) around the params of a converted
        checkpoint directory (`bf16jax.interop.convert`), restored in their shardings and cast to
        the
        policy's param dtypes. The model config must be the directory's (see
        `convert.resolve_init_from`)."""
        from bf16jax.interop import convert  # convert imports the checkpoint stack; keep it lazy

        params = convert.restore_params(directory, self.abstract.params)
        sh = self.state_shardings
        with jax.set_mesh(self.mesh), nnx.use_eager_sharding(False):
            init = jax.jit(self._init, in_shardings=(sh.params,), out_shardings=sh)
            return init(params)

    def _jit_step(self, diagnostics: bool, param_norm: bool):
        cfg = self.config
        fn = functools.partial(
            train_step,
            graphdef=self.graphdef,
            optimizer=self.optimizer,
            grad_accum_steps=int(cfg.train.grad_accum_steps),
            loss=self.loss,
            diagnostics=diagnostics,
            param_norm=param_norm,
            compute_dtype=self.policy.compute_dtype,
        )
        batch_sharding = sharding.batch_sharding(self.mesh)
        return jax.jit(
            fn,
            in_shardings=(self.state_shardings, batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )

    @functools.cached_property
    def _step_fn(self):
        """The step of the iterations that do not log: no diagnostics, no param norm."""
        return self._jit_step(diagnostics=False, param_norm=False)

    @functools.cached_property
    def _diagnostic_step_fn(self):
        """The logging steps' step: + the param norm, + swamping / gradient-health reductions
        when `train.diagnostics` is on."""
        return self._jit_step(diagnostics=bool(self.config.train.diagnostics), param_norm=True)

    @functools.cached_property
    def _metrics_step_fn(self):
        """The step + the param norm, no diagnostics (`step()`'s default)."""
        if not self.config.train.diagnostics:
            return self._diagnostic_step_fn
        return self._jit_step(diagnostics=False, param_norm=True)

    @functools.cached_property
    def _eval_fn(self):
        fn = functools.partial(eval_step, graphdef=self.graphdef)
        sh = self.state_shardings
        return jax.jit(fn, in_shardings=(sh.params, None, sh.fp8_meta))

    @functools.cached_property
    def _predict_fn(self):
        fn = functools.partial(predict_step, graphdef=self.graphdef)
        sh = self.state_shardings
        # Replicated outputs: every process can read all per-example stats.
        out = NamedSharding(self.mesh, P())
        return jax.jit(fn, in_shardings=(sh.params, None, sh.fp8_meta), out_shardings=out)

    @functools.cached_property
    def _shadow_fn(self):
        fn = functools.partial(
            shadow_fp32_step, graphdef=self.diag_graphdef, fp32_graphdef=self.fp32_graphdef
        )
        sh = self.state_shardings
        return jax.jit(fn, in_shardings=(sh.params, None, sh.fp8_meta))

    @functools.cached_property
    def _drift_batch(self) -> dict:
        ds = data_lib.make_dataset(
            self.config.data,
            "eval",
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            model=self.config.model.name,
        )
        return self.global_batch(next(iter(ds)))

    @property
    def has_drift_reference(self) -> bool:
        """False when the policy is its own FP32 reference (fp32, fp32 + QAT): no drift check."""
        return self.policy != fp32_reference(self.policy)

    def drift(self, params, fp8_meta=None) -> dict[str, float]:
        """The BF16-vs-FP32 drift on a fixed eval batch (see `shadow_fp32_step`)."""
        fp8_meta = self._empty_meta if fp8_meta is None else fp8_meta
        with jax.set_mesh(self.mesh):
            out = self._shadow_fn(params, self._drift_batch, fp8_meta)
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def host_model(self, state: TrainState) -> nnx.Module:
        """The model holding `state`'s params (and FP8 meta), fetched to the host."""
        return _merge(self.graphdef, *jax.device_get((state.params, state.fp8_meta)))

    def step(
        self, state: TrainState, batch: dict, *, diagnostics: bool = False, param_norm: bool = True
    ) -> tuple[TrainState, dict]:
        """One jitted train step; `state` is donated (do not use it afterwards). `diagnostics`:
        the variant with `swamped/*`, `grad/*` metrics (`train.diagnostics`) and `param_norm`,
        for logged steps; `param_norm=False` (and no diagnostics): the loop's step for the
        iterations that do not log, without the param norm's reduction per leaf."""
        if diagnostics:
            fn = self._diagnostic_step_fn
        else:
            fn = self._metrics_step_fn if param_norm else self._step_fn
        with jax.set_mesh(self.mesh):
            return fn(state, batch)

    def lower(self, *, diagnostics: bool = False) -> jax.stages.Lowered:
        """The jitted step (or its diagnostic variant) lowered on the abstract sharded state and
        batch, nothing allocated: `.as_text()` is what XLA gets, `.compile()` the program."""
        b, sh = int(self.config.data.batch_size), sharding.batch_sharding(self.mesh)
        batch = {
            k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sh)
            for k, (shape, dtype) in data_lib.example_spec(
                self.config.data, self.config.model.name
            ).items()
        }
        fn = self._diagnostic_step_fn if diagnostics else self._step_fn
        with jax.set_mesh(self.mesh):
            return fn.lower(self.abstract, batch)

    def compile(self, state: TrainState, batch: dict, *, plain: bool = True) -> float:
        """Compiles the train step for these shapes: the logging variant, and the plain one
        unless `plain` is False (a run that logs every step never runs it); returns the seconds
        it took."""
        start = time.perf_counter()
        fns = {self._diagnostic_step_fn, self._step_fn} if plain else {self._diagnostic_step_fn}
        with jax.set_mesh(self.mesh):
            for fn in fns:
                fn.lower(state, batch).compile()
        return time.perf_counter() - start

    def global_batch(self, local_batch: dict) -> dict:
        return sharding.make_global_batch(local_batch, self.mesh)

    @property
    def _empty_meta(self):
        if jax.tree.leaves(self.abstract.fp8_meta):
            raise ValueError(
                f"Policy {self.policy} has FP8 layers: pass fp8_meta=state.fp8_meta to evaluate "
                "the model with its delayed scales."
            )
        return self.abstract.fp8_meta

    def eval_batches(self, num_batches: int | None = None):
        """This process's first `num_batches` (default `train.eval_steps`) local eval batches."""
        return evaluation.eval_batches(self.config, num_batches)

    def predict(self, params, local_batch: dict, fp8_meta=None) -> dict[str, Any]:
        """Per-example stats (NumPy, whole global batch) of one local eval batch: see
        `predict_step`. `fp8_meta` is required for `q=fp8` policies."""
        fp8_meta = self._empty_meta if fp8_meta is None else fp8_meta
        with jax.set_mesh(self.mesh):
            out = self._predict_fn(params, self.global_batch(local_batch), fp8_meta)
        return jax.device_get(out)

    def evaluate(self, params, num_batches: int | None = None, fp8_meta=None) -> dict[str, float]:
        """Loss, accuracy and, for language models, perplexity on (the first `num_batches` of)
        the eval split.

        `fp8_meta`: `state.fp8_meta`, required when the policy has `q=fp8`.
        """
        fp8_meta = self._empty_meta if fp8_meta is None else fp8_meta
        out = self._evaluate_batches(params, self.eval_batches(num_batches), fp8_meta)
        # A mixture of prepared datasets: also the loss of each source alone.
        for name, data_cfg in mixture_lib.source_configs(self.config.data):
            cfg = self.config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.data = data_cfg
            batches = evaluation.eval_batches(cfg, num_batches)
            out[f"{name}/loss"] = self._evaluate_batches(params, batches, fp8_meta)["loss"]
        return out

    def _evaluate_batches(self, params, batches, fp8_meta) -> dict[str, float]:
        totals = None
        with jax.set_mesh(self.mesh):
            for local in batches:
                out = self._eval_fn(params, self.global_batch(local), fp8_meta)
                out.pop("log_z")
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if totals is None:
            raise ValueError("The eval split yielded no batch: lower config.data.eval_batch_size.")
        weight = max(float(totals["weight"]), 1.0)
        loss = float(totals["loss_sum"]) / weight
        out = {"loss": loss, "accuracy": float(totals["correct"]) / weight}
        if self.config.model.name in config_lib.LANGUAGE_MODELS:
            out["perplexity"] = math.exp(min(loss, 80.0))
        return out


def _graphdef(
    config,
    policy: Policy,
    *,
    platform: str,
    track_logits: bool = False,
    attention_impl: str | None = None,
) -> tuple[nnx.GraphDef, nnx.Module]:
    """The model's graphdef under `policy` for `platform` and the abstract model (no device
    memory).

    `track_logits` turns on the attention layers' max-|logit| intermediates (diagnostics);
    `attention_impl` replaces the config's.
    """
    model_cfg = config.model
    if attention_impl is not None:
        model_cfg = model_cfg.copy_and_resolve_references()
        model_cfg.attention_impl = attention_impl
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(
            lambda: build_model(model_cfg, policy, rngs=nnx.Rngs(config.seed), platform=platform)
        )
    if track_logits:
        for _, module in nnx.iter_modules(abstract_model):
            if isinstance(module, Attention):
                module.track_logits = True
    graphdef, _, _, rest = nnx.split(abstract_model, nnx.Param, FP8Meta, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "bf16jax models may only hold nnx.Param and quant.FP8Meta state; found other "
            f"variables: {[path for path, _ in nnx.to_flat_state(rest)]}."
        )
    return graphdef, abstract_model


def create_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """Validates `config` and builds the Trainer (nothing is allocated on devices yet)."""
    config_lib.validate(config)
    policy = get_policy(config.precision)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    rules = sharding.resolve_rules(config.mesh.rules)
    optimizer = optim.make_optimizer(
        config.optim, total_steps=int(config.train.steps), update_rule=policy.update_rule
    )
    # The attention kernel is chosen for the devices the step runs on (a TPU topology when
    # compiling ahead of time on a CPU host), and a forced one they lack fails here.
    platform = mesh.devices.flat[0].platform
    with record_paths() as paths:
        graphdef, abstract_model = _graphdef(config, policy, platform=platform)
    if policy.overrides:
        log.info("Policy overrides hit: %s", describe_rule_hits(policy, paths))
    loss = loss_lib.loss_options(config, abstract_model.output_head)
    # The FP32 reference of the drift diagnostic uses bf16jax's XLA attention (cuDNN would
    # refuse FP32, and the reference should not depend on a kernel).
    fp32_graphdef, _ = _graphdef(
        config, fp32_reference(policy), platform=platform, attention_impl="xla"
    )
    # Stacked (scanned) layers would need the intermediates threaded through nnx.scan.
    tracking = not config.model.get("scan_layers", False)
    diag_graphdef, _ = _graphdef(config, policy, platform=platform, track_logits=tracking)
    trainer = Trainer(
        config=config,
        policy=policy,
        mesh=mesh,
        graphdef=graphdef,
        fp32_graphdef=fp32_graphdef,
        diag_graphdef=diag_graphdef,
        optimizer=optimizer,
        abstract=None,  # set below: _init needs the trainer
        n_params=param_count(abstract_model),
        loss=loss,
    )
    abstract = sharding.abstract_state(trainer._init, mesh, rules)
    # Loud, at start-up: decay that 16-bit weights under round-to-nearest cannot take.
    optim.check_decay_precision(
        config.optim, abstract.params, optimizer.rule, total_steps=int(config.train.steps)
    )
    # Optimizer moments (and update-rule buffers) take their parameter's sharding.
    param_sh = sharding.shardings_of(abstract.params)
    opt_sh = sharding.opt_state_shardings(abstract.opt_state, param_sh)
    trainer.abstract = abstract.replace(
        opt_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract.opt_state,
            opt_sh,
        )
    )
    return trainer
