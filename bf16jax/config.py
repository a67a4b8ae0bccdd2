"""The config schema: every key a bf16jax run reads, with its default, in one place.

`configs/<name>.py` files start from `base_config(model=...)` and change what they need; the
result is locked, so a misspelt key (`--config.optim.lrate=...`) fails instead of being ignored.
`validate(config)` checks values that the type system cannot (names, divisibility, ranges) and
raises `ValueError` naming the key and the fix. `load_config(path, ["train.steps=10", ...])` is
the same for scripts and notebooks: the file's `get_config()` with the overrides parsed by
ml_collections' `config_flags`, exactly as `--config.train.steps=10` on a command line, then
locked. `config_help(config)` lists every key with its type and value (`--config_help`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Iterable

import ml_collections

from bf16jax.nn.attention import normalize_implementation
from bf16jax.precision import get_policy, parse_dtype

MODEL_DEFAULTS = {
    "gpt": dict(
        vocab_size=384,
        num_layers=4,
        num_heads=4,
        embed_dim=128,
        mlp_dim=512,
        max_len=256,
        scan_layers=False,
        remat="none",  # none | save_dots | full (bf16jax.models.gpt.REMAT_POLICIES)
        attention_impl="auto",  # auto | xla | cudnn | pallas (bf16jax.nn.attention)
        norm_eps=1e-5,
        mlp_activation="gelu",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        mlp_dropout_rate=0.0,
        tie_embeddings=True,
    ),
    "t5": dict(
        vocab_size=384,
        embed_dim=128,
        num_heads=4,
        head_dim=32,
        mlp_dim=256,
        num_encoder_layers=2,
        num_decoder_layers=2,
        tie_embeddings=False,
        relpos_buckets=32,
        relpos_max_distance=128,
        attention_impl="auto",
        norm_eps=1e-6,
        mlp_activation="gated-gelu",  # T5 v1.1 / FLAN-T5; "relu" is T5 v1.0
        dropout_rate=0.0,  # FLAN-T5 fine-tuning uses 0.1 (residual, embeddings)
        attention_dropout_rate=0.0,
        mlp_dropout_rate=0.0,
    ),
    "vit": dict(
        image_size=8,
        patch_size=2,
        channels=1,
        num_classes=10,
        embed_dim=64,
        num_layers=4,
        num_heads=4,
        mlp_dim=128,
        attention_impl="auto",
        norm_eps=1e-5,
        mlp_activation="gelu",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        mlp_dropout_rate=0.0,
    ),
}

DATA_FOR_MODEL = {"gpt": "kjv_bytes", "t5": "kjv_span", "vit": "digits"}
# Model families that predict tokens: their held-out metrics include perplexity.
LANGUAGE_MODELS = ("gpt", "t5")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "constant")
LOSS_SCALES = ("none", "static", "dynamic")
LOSS_IMPLS = ("auto", "fused", "materialized")
DISTRIBUTED = ("auto", "yes", "no")
REMAT = ("none", "save_dots", "full")  # keys of bf16jax.models.gpt.REMAT_POLICIES


def base_config(model: str = "gpt") -> ml_collections.ConfigDict:
    """Returns a complete, unlocked config for `model` ("gpt", "t5" or "vit")."""
    if model not in MODEL_DEFAULTS:
        raise ValueError(f"Unknown model {model!r}: use one of {', '.join(MODEL_DEFAULTS)}.")
    c = ml_collections.ConfigDict()
    c.precision = "bf16"
    c.seed = 0
    # A directory written by `python -m bf16jax.convert import`: a fresh run starts from its
    # params (fresh optimizer state, step 0) and takes its architecture; "" = random init.
    c.init_from = ""
    c.model = ml_collections.ConfigDict(dict(name=model, **MODEL_DEFAULTS[model]))
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=3e-3,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            momentum=0.9,
            mu_dtype="f32",
            nu_dtype="f32",
            clip_norm=1.0,
            schedule="cosine",
            warmup_steps=50,
            min_lr_ratio=0.1,
            update_rule="",  # "" = the policy's (u=...); or nearest | stochastic | kahan
            moment_rounding="nearest",  # "stochastic": 16-bit moments stored with SR
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            name=DATA_FOR_MODEL[model],
            batch_size=32,
            eval_batch_size=32,
            seq_len=128,
            enc_len=128,
            dec_len=32,
            noise_density=0.15,
            mean_noise_span=3.0,
            seed=0,
            num_workers=0,
            # "" = bytes (tokenizer.py); a directory / file with spiece.model or tokenizer.json;
            # "init_from" = the tokenizer of config.init_from's directory.
            tokenizer="",
            prompt="continue: ",  # kjv_continuation: the text-to-text task's input prefix
            # data.name="prepared": a `python -m bf16jax.prepare` directory (local or gs://),
            # or a mixture "DIR=WEIGHT,DIR=WEIGHT" (weights > 0, normalised; "" = path alone).
            path="",
            mixture="",
            # Prepared data: GPT several documents per row with segment_ids / positions; T5
            # several examples per row as separate segments (bf16jax.data.readers).
            packing=False,
            # Prepared text2text: the fraction of input/target pairs longer than enc_len /
            # dec_len that may be left out (counted in the log); above it the run refuses.
            max_dropped_fraction=0.0,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=500,
            grad_accum_steps=1,
            log_every=50,
            eval_every=250,
            eval_steps=8,
            loss_scale="none",
            loss_scale_init=2.0**15,
            loss_scale_period=2000,
            loss_scale_min=1.0,
            z_loss=0.0,
            # "auto": the fused chunked loss (no [B, T, V] logits) for gpt / t5 with an
            # unquantized head, else the materialized one; or "fused" / "materialized".
            loss_impl="auto",
            loss_chunk_tokens=1024,  # fused loss: tokens per device per chunk
            sample_tokens=0,
            diagnostics=True,  # swamping + gradient health in the metrics of logged steps
            drift_every=0,  # shadow FP32 eval of a fixed batch: every N steps, 0 each eval, -1 off
            # Stop (exit 3) after this many skipped (non-finite) steps in a row; 0 = never.
            max_skips_in_a_row=25,
            # Instead of stopping: roll back to the last good checkpoint and skip the data the
            # skipped steps consumed, at most this many times per run (0 = stop).
            nonfinite_rollbacks=0,
            preemption_grace_s=25.0,  # SIGTERM/SIGINT -> save -> exit 75 within this time
            # Multi-host: the hosts agree on a stop every N steps (a coordination-service barrier,
            # ~1 ms of host time, no device sync); the stop comes up to N - 1 steps later.
            preemption_check_every=1,
        )
    )
    c.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, rules=(), distributed="auto")
    )
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=250,
            max_to_keep=2,
            async_save=True,
            verify_saves=True,  # read each save back and check its checksums once committed
            # Keys allowed to differ from the checkpoint's config on resume (see
            # `resume_changes`): "" (none), "all", or e.g. "precision,optim.mu_dtype".
            allow_config_change="",
        )
    )
    return c


def _one_of(value, accepted, key: str):
    if value not in accepted:
        raise ValueError(
            f"config.{key}={value!r} is not valid: use one of {', '.join(map(repr, accepted))}."
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for values no run could use; names the key and the fix."""
    try:
        get_policy(config.precision)
    except ValueError as e:
        raise ValueError(f"config.precision: {e}") from None
    _one_of(config.model.name, tuple(MODEL_DEFAULTS), "model.name")
    _one_of(config.optim.name, OPTIMIZERS, "optim.name")
    _one_of(config.optim.schedule, SCHEDULES, "optim.schedule")
    _one_of(config.train.loss_scale, LOSS_SCALES, "train.loss_scale")
    _one_of(config.train.loss_impl, LOSS_IMPLS, "train.loss_impl")
    _one_of(config.mesh.distributed, DISTRIBUTED, "mesh.distributed")
    try:
        normalize_implementation(config.model.get("attention_impl", "auto"))
    except ValueError as e:
        raise ValueError(f"config.model.attention_impl: {e}") from None
    if "remat" in config.model:
        _one_of(config.model.remat, REMAT, "model.remat")
    for key in ("mu_dtype", "nu_dtype"):
        try:
            parse_dtype(config.optim[key])
        except ValueError as e:
            raise ValueError(f"config.optim.{key}: {e}") from None
    keys = ("steps", "grad_accum_steps", "log_every", "eval_every", "eval_steps")
    for key in (*keys, "loss_chunk_tokens"):
        if config.train[key] < 1:
            raise ValueError(f"config.train.{key}={config.train[key]} must be >= 1.")
    if config.data.batch_size % config.train.grad_accum_steps:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by "
            f"config.train.grad_accum_steps={config.train.grad_accum_steps}: change one of them."
        )
    if config.train.drift_every < -1:
        raise ValueError(
            f"config.train.drift_every={config.train.drift_every}: use N > 0 (every N steps), "
            "0 (at each eval) or -1 (off)."
        )
    if config.data.name == "prepared":
        if not (config.data.get("path") or config.data.get("mixture")):
            raise ValueError(
                "config.data.name='prepared' reads a prepared dataset: pass "
                "--config.data.path=DIR (python -m bf16jax.prepare ... --out=DIR) or "
                "--config.data.mixture=DIR=W,DIR=W."
            )
        if config.model.name not in LANGUAGE_MODELS:
            raise ValueError(
                f"config.data.name='prepared' feeds gpt / t5, not model.name={config.model.name!r}."
            )
    if config.data.get("tokenizer") == "init_from" and not config.get("init_from"):
        raise ValueError(
            "config.data.tokenizer='init_from' reads the tokenizer of config.init_from, which is "
            "empty: pass --config.init_from=DIR (a `python -m bf16jax.convert import` output)."
        )
    if config.checkpoint.every_steps < 0 or config.checkpoint.max_to_keep < 1:
        raise ValueError(
            f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0 and "
            f"max_to_keep={config.checkpoint.max_to_keep} >= 1."
        )
    _validate_more(config)


def _validate_more(config: ml_collections.ConfigDict) -> None:
    lr = config.optim.learning_rate
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"config.optim.learning_rate={lr} must be a finite number >= 0.")
    for key in ("max_skips_in_a_row", "nonfinite_rollbacks"):
        if config.train.get(key, 0) < 0:
            raise ValueError(f"config.train.{key}={config.train[key]} must be >= 0 (0 = off).")
    every = config.train.get("preemption_check_every", 1)
    if every < 1:
        raise ValueError(
            f"config.train.preemption_check_every={every} must be >= 1 (1 = check every step)."
        )
    grace = config.train.get("preemption_grace_s", 0.0)
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"config.train.preemption_grace_s={grace} must be >= 0 (0 = no limit).")
    for key in ("batch_size", "eval_batch_size", "seq_len", "enc_len", "dec_len"):
        if key in config.data and config.data[key] < 1:
            raise ValueError(f"config.data.{key}={config.data[key]} must be >= 1.")
    m, d = config.model, config.data
    if m.name == "gpt" and d.get("seq_len", 0) > m.max_len:
        raise ValueError(
            f"config.data.seq_len={d.seq_len} is longer than config.model.max_len={m.max_len} "
            "(the position table): raise model.max_len or lower data.seq_len."
        )
    allowed = config.checkpoint.get("allow_config_change", "")
    if allowed and allowed != "all":
        known = set(flatten(config))
        for key in (k.strip() for k in allowed.split(",") if k.strip()):
            if key not in known and not any(k.startswith(key + ".") for k in known):
                raise ValueError(
                    f"config.checkpoint.allow_config_change names {key!r}, not a config key: "
                    "list keys like precision,optim.mu_dtype (or 'all')."
                )


# ----------------------------------------------------------------------------- resume changes
# What a change of each key does to a resumed run. STATE: the saved state would mean something
# else (its dtypes, shapes, optimizer statistics, loss scale, or the data position's meaning):
# refused unless `checkpoint.allow_config_change` names it. TRAJECTORY: the state still means
# the same but training continues differently: allowed, with a warning. Anything else (steps,
# logging, evaluation, checkpoint cadence, mesh) is harmless: allowed and logged.
STATE_PREFIXES = ("model.", "data.")
STATE_KEYS = frozenset(
    {
        "precision",
        "optim.name",
        "optim.b1",
        "optim.b2",
        "optim.eps",
        "optim.momentum",
        "optim.mu_dtype",
        "optim.nu_dtype",
        "optim.update_rule",
        "optim.moment_rounding",
        "train.loss_scale",
    }
)
NOT_STATE = frozenset({"data.eval_batch_size", "data.eval_repeat", "data.max_dropped_fraction"})
TRAJECTORY_KEYS = frozenset(
    {
        "seed",
        "optim.learning_rate",
        "optim.schedule",
        "optim.warmup_steps",
        "optim.min_lr_ratio",
        "optim.weight_decay",
        "optim.clip_norm",
        "train.z_loss",
        "train.grad_accum_steps",
        "train.loss_scale_period",
        "train.loss_scale_min",
        "model.dropout_rate",
        "model.attention_dropout_rate",
        "model.mlp_dropout_rate",
    }
)
# Read only when a run starts from step 0 (a resumed run ignores it).
HARMLESS_KEYS = frozenset({"init_from"})


def flatten(config) -> dict:
    """{"optim.learning_rate": 0.003, ...}: a config (or its JSON dict) as dotted leaf keys,
    values JSON-normalized (tuples as lists)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = json.loads(json.dumps(value))

    walk(tree, "")
    return out


def resume_changes(saved: dict, config) -> dict[str, list[tuple[str, object, object]]]:
    """The differences between a checkpoint's config (`saved`, flattened) and `config`, by kind.

    Returns:
      {"state": [...], "trajectory": [...], "harmless": [...]} of (key, old, new); keys that
      only one side has (another bf16jax version) are ignored.
    """
    new = flatten(config)
    out: dict[str, list] = {"state": [], "trajectory": [], "harmless": []}
    for key in sorted(set(saved) & set(new)):
        if saved[key] == new[key]:
            continue
        if key in TRAJECTORY_KEYS:
            kind = "trajectory"
        elif key in HARMLESS_KEYS:
            kind = "harmless"
        elif key in STATE_KEYS or (key.startswith(STATE_PREFIXES) and key not in NOT_STATE):
            kind = "state"
        else:
            kind = "harmless"
        out[kind].append((key, saved[key], new[key]))
    return out


def allowed_changes(config) -> set[str] | None:
    """The keys `checkpoint.allow_config_change` lets differ (None = all)."""
    text = config.checkpoint.get("allow_config_change", "")
    if text.strip() == "all":
        return None
    return {k.strip() for k in text.split(",") if k.strip()}


def is_allowed(key: str, allowed: set[str] | None) -> bool:
    return allowed is None or any(key == a or key.startswith(a + ".") for a in allowed)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_path(name: str) -> str:
    """The path of the repository's `configs/NAME.py` (e.g. "gpt_tiny").

    The configs live beside the package in the repository, so this works from a clone (an
    editable install, or `sys.path` pointing at the clone), not from a wheel.
    """
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        files = os.listdir(CONFIG_DIR) if os.path.isdir(CONFIG_DIR) else []
        known = sorted(f[:-3] for f in files if f.endswith(".py"))
        if not known:
            raise FileNotFoundError(
                f"No configs/ folder beside bf16jax ({CONFIG_DIR}): the configs ship with the "
                "repository; clone it and `pip install -e .` (or add the clone to sys.path)."
            )
        raise FileNotFoundError(f"No config {name!r} in {CONFIG_DIR}: use one of {known}.")
    return path


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path`'s `get_config()`, applies overrides, returns it locked.

    Args:
      path: a `configs/*.py` file.
      overrides: `KEY=VALUE` (or `--config.KEY=VALUE`) strings, parsed by ml_collections'
        `config_flags` as the same flags are on `python -m bf16jax.main`'s command line: by the
        type of the value they replace (bools as true/false, tuples as Python literals); a later
        override of a key wins.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: an override is not KEY=VALUE, names a key the config lacks, or has a value of
        the wrong type.
    """
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} not found: pass a configs/*.py path.")
    argv = ["load_config", f"--config={path}"]
    for item in overrides:
        key, sep, _ = item.removeprefix("--config.").partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not KEY=VALUE (e.g. train.steps=100).")
        argv.append(item if item.startswith("--config.") else f"--config.{item}")
    # A private FlagValues: parsing here never touches absl's global flags.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: the key is not in the config
        bad = [a.split("=", 1)[0].removeprefix("--config.") for a in argv[2:]]
        hint = re.search(r'Did you mean "([^"]+)"', str(e))
        raise ValueError(
            f"Override of {', '.join(bad)}: the config has no key "
            f"{_missing_key(bad, str(e))!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + ". List the keys with --config_help."
        ) from None
    except flags.Error as e:  # a value of the wrong type (or a flag without its value)
        raise ValueError(_bad_value(path, str(e))) from None
    config = flag_values.config
    if not hasattr(config, "lock"):
        raise ValueError(
            f"{path}: get_config() returned a {type(config).__name__}, not an "
            "ml_collections.ConfigDict."
        )
    return config


def _bad_value(path: str, error: str) -> str:
    """`Override train.steps='many': train.steps takes an int value (...)` from absl's error."""
    m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", error, re.S)
    if m is None:
        return f"Override rejected: {error.removeprefix('flag ')}."
    key, value, reason = m.groups()
    node = load_config(path)
    for part in key.split("."):
        node = node[part]
    kind = type(node).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"Override {key}={value!r}: {key} takes {article} {kind} value ({reason})."


def _missing_key(keys: list[str], error: str) -> str:
    """The override whose last part ml_collections named as missing (else all of them)."""
    names = set(re.findall(r"\w+", error))
    hits = [k for k in keys if k.split(".")[-1] in names]
    return hits[0] if len(hits) == 1 else ", ".join(keys)


def config_help(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` as `--config.KEY=VALUE  (type)` lines, sorted by key.

    What `--config_help` prints: the fields a `--config.KEY=VALUE` override can set, with the
    type it is parsed as and the value the config file (after any overrides) gives it.
    """
    rows = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                rows.append((f"--config.{prefix}{key}={_as_flag(value)}", type(value).__name__))

    walk(config, "")
    width = max(len(flag) for flag, _ in rows)
    return "\n".join(f"{flag:{width}s}  ({kind})" for flag, kind in rows)


def _as_flag(value) -> str:
    """`value` as a shell word the override parser reads back as `value`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return shlex.quote(value)
    return shlex.quote(repr(value)) if isinstance(value, (tuple, list)) else str(value)
