"""Pretrained checkpoints in and out: Hugging Face directories <-> bf16jax checkpoints.

    python -m bf16jax.convert import HF_DIR OUT_DIR [--precision=bf16]
    python -m bf16jax.convert export OUT_DIR HF_OUT [--checkpoint=WORKDIR] [--step=N]

`import` reads a transformers model directory (config.json + model.safetensors, or a sharded
model.safetensors.index.json) of GPT-2 or T5 (v1.0, v1.1 / FLAN-T5), builds the bf16jax model
config (`bf16jax.interop.hf.model_config_from_hf`, which refuses what bf16jax would compute
differently),
casts the params to the policy's param dtype and writes a converted directory:

    OUT_DIR/bf16jax.json      manifest: model config, policy, and the HF file layout
    OUT_DIR/checkpoints/0/    Orbax checkpoint {"params": ...} that `--config.init_from` reads
    OUT_DIR/config.json, tokenizer and generation files, copied verbatim
    OUT_DIR/hf_extra.safetensors   tensors the model does not use (GPT-2's old mask buffers)

`export` writes the params of OUT_DIR (or of a training workdir that started from it) back as a
HF directory with the original file names, tensor order, dtypes and metadata: an import
followed by an export reproduces the original safetensors files byte for byte. A training run
starts from a converted directory with `--config.init_from=OUT_DIR` (`resolve_init_from`,
`restore_params`): params from the checkpoint, fresh optimizer state, step 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bf16jax.checkpoint.manager import Checkpointer
from bf16jax.interop import hf
from bf16jax.models import build_model
from bf16jax.precision import get_policy

__all__ = [
    "MANIFEST",
    "import_hf",
    "export_hf",
    "load_manifest",
    "abstract_params",
    "restore_params",
    "resolve_init_from",
]

log = logging.getLogger(__name__)

MANIFEST = "bf16jax.json"
EXTRA = "hf_extra.safetensors"
CHECKPOINTS = "checkpoints"
# Copied verbatim in both directions: tokenizers and generation defaults.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "vocab.json",
    "merges.txt",
)
# Keys of config.model that a run may set freely on top of a pretrained architecture.
TRAINING_KEYS = (
    "dropout_rate",
    "attention_dropout_rate",
    "mlp_dropout_rate",
    "attention_impl",
    "remat",
)


# ----------------------------------------------------------------------------- params
def _leaf_path(path) -> str:
    """ "blocks/0/attn/q/kernel" for a tree path into an nnx.State of Params."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    return "/".join(p for p in parts if p != "value")


def abstract_params(model_cfg: Mapping, policy: str = "fp32"):
    """The nnx.State of Params (ShapeDtypeStructs) of the model `model_cfg` under `policy`."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build_model(model_cfg, policy, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _fill(abstract, arrays: Mapping[str, np.ndarray]):
    """`abstract` (nnx.State) with each leaf replaced by `arrays[path]` in the leaf's dtype."""
    paths = {_leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    missing, extra = sorted(paths - set(arrays)), sorted(set(arrays) - paths)
    if missing or extra:
        raise ValueError(f"Params do not match the model: missing {missing}, unexpected {extra}.")

    def one(path, leaf):
        value = arrays[_leaf_path(path)]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(
                f"Param {_leaf_path(path)}: shape {tuple(value.shape)} from the checkpoint, "
                f"{tuple(leaf.shape)} in the model."
            )
        return jnp.asarray(value).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def _flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {_leaf_path(p): np.asarray(v) for p, v in leaves}


# ----------------------------------------------------------------------------- import
def import_hf(hf_dir: str, out_dir: str, *, precision: str = "bf16") -> dict[str, Any]:
    """Converts the HF model directory `hf_dir` into a bf16jax directory `out_dir`.

    Args:
      hf_dir: config.json + model.safetensors (or a sharded index) of GPT-2 or T5.
      out_dir: created; must not exist or be empty.
      precision: a policy string; params are stored in its param dtype.

    Returns:
      The manifest written to `out_dir/bf16jax.json`.

    Raises:
      hf.UnsupportedModelError: a config bf16jax cannot represent (field and value named).
      FileNotFoundError / ValueError: a missing or malformed file (named), or tensors that do
        not match the config.
    """
    policy = get_policy(precision)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not empty: pass a new directory.")
    hf_config = hf.read_json(os.path.join(hf_dir, "config.json"))
    model_cfg = hf.model_config_from_hf(hf_config)
    tensors, layout = hf.read_safetensors(hf_dir)
    names = set(tensors)
    prefix = hf.gpt2_prefix(names) if model_cfg["name"] == "gpt" else ""
    entries = hf.tensor_map(model_cfg, prefix)
    arrays: dict[str, np.ndarray] = {}
    where = f"{hf_dir} ({', '.join(layout['files'])})"
    for entry in entries:
        name = entry[0]
        if name not in tensors:
            raise ValueError(
                f"{where} has no tensor {name!r}, which config.json's "
                f"{hf_config.get('model_type')} architecture needs."
            )
        arrays.update(hf.to_params(entry, tensors[name]))
    shared = tensors[entries[0][0]]
    extra = {}
    for name in sorted(names - {e[0] for e in entries}):
        if name in hf.aliases(model_cfg):
            if not np.array_equal(tensors[name], shared):
                raise ValueError(
                    f"{where}: {name!r} differs from {entries[0][0]!r} though config.json ties "
                    "them (tie_word_embeddings): fix the config or the file."
                )
        elif name in hf.buffer_names(model_cfg, prefix):
            extra[name] = tensors[name]
        else:
            raise ValueError(
                f"{where}: tensor {name!r} is not part of the {model_cfg['name']} model bf16jax "
                "builds from this config.json; refusing rather than dropping it."
            )
    params = _fill(abstract_params(model_cfg, str(policy)), arrays)
    os.makedirs(out_dir, exist_ok=True)
    with Checkpointer(os.path.join(out_dir, CHECKPOINTS), max_to_keep=1) as ckpt:
        ckpt.save(0, {"params": params}, force=True)
    if extra:
        from safetensors.numpy import save_file

        save_file(extra, os.path.join(out_dir, EXTRA))
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    manifest = {
        "format": 1,
        "source": os.path.abspath(hf_dir),
        "model": model_cfg,
        "precision": str(policy),
        "hf": {"prefix": prefix, "aliases": sorted(names & set(hf.aliases(model_cfg))), **layout},
    }
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    log.info("Imported %s (%s) into %s", hf_dir, model_cfg["name"], out_dir)
    return manifest


def load_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a converted directory; raises naming the file when absent or bad."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a converted checkpoint. Create one with "
            "`python -m bf16jax.convert import HF_DIR OUT_DIR`."
        )
    manifest = hf.read_json(path)
    if manifest.get("format") != 1 or "model" not in manifest:
        raise ValueError(f"{path} is not a bf16jax manifest (format 1 with a 'model').")
    return manifest


def restore_params(directory: str, target, *, step: int | None = None):
    """Params (nnx.State) from the newest (or `step`) checkpoint under `directory`.

    `directory` is a converted directory or a training workdir (its `checkpoints/`); `target`
    is the params' sharded ShapeDtypeStructs (a `Trainer.abstract.params`, or
    `abstract_params` placed by `_placed`): float leaves are cast to the target's dtypes.
    """
    ckpt_dir = os.path.join(directory, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} not found: pass a converted directory or workdir.")
    with Checkpointer(ckpt_dir, create=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{ckpt_dir} holds no committed checkpoint.")
        return ckpt.restore(step, {"params": target}, partial=True)["params"]


def _placed(abstract):
    """`abstract` with every leaf replicated on the first device (a restore target)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract
    )


# ----------------------------------------------------------------------------- export
def export_hf(
    src_dir: str, out_dir: str, *, checkpoint: str | None = None, step: int | None = None
) -> None:
    """Writes a HF directory (config.json + safetensors + tokenizer files) from bf16jax params.

    Args:
      src_dir: a converted directory (`import_hf`): the manifest and HF side files.
      out_dir: the HF directory to write (created; must not exist or be empty).
      checkpoint: a training workdir whose params replace `src_dir`'s (e.g. after fine-tuning
        with `--config.init_from=src_dir`); its model must be `src_dir`'s.
      step: that checkpoint's step (default: the newest).
    """
    manifest = load_manifest(src_dir)
    model_cfg, layout = manifest["model"], manifest["hf"]
    target = _placed(abstract_params(model_cfg, "fp32"))  # exact for f32 / bf16 / f16 storage
    params = _flat(restore_params(checkpoint or src_dir, target, step=step))
    tensors = {}
    entries = hf.tensor_map(model_cfg, layout["prefix"])
    for entry in entries:
        tensors[entry[0]] = hf.from_params(entry, params)
    for name in layout["aliases"]:
        tensors[name] = tensors[entries[0][0]]
    extra_path = os.path.join(src_dir, EXTRA)
    if os.path.isfile(extra_path):
        from safetensors.numpy import load_file

        tensors.update(load_file(extra_path))
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not empty: pass a new directory.")
    hf.write_safetensors(out_dir, tensors, layout)
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    if model_cfg["name"] == "t5":
        _write_readable_config(out_dir)
    log.info("Exported %s to %s", checkpoint or src_dir, out_dir)


def _write_readable_config(out_dir: str) -> None:
    """Rewrites a transformers-5-form T5 config.json in the form the installed transformers
    reads (`hf.t5_config_for_transformers`; the 4.x form when transformers is absent)."""
    path = os.path.join(out_dir, "config.json")
    cfg = hf.read_json(path)
    readable = hf.t5_config_for_transformers(cfg, hf.installed_transformers())
    if readable != cfg:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(readable, indent=2, sort_keys=True) + "\n")  # as save_pretrained


# ----------------------------------------------------------------------------- init_from
def resolve_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the architecture of `config.init_from`'s model (a copy; unchanged if unset).

    Every `config.model` key except the training ones (dropout rates, attention_impl, remat)
    takes the converted model's value; each one that changes is logged as a warning. A model
    family mismatch raises. `data.tokenizer="init_from"` becomes the converted directory.
    """
    source = config.get("init_from", "")
    if not source:
        return config
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"config.init_from={source} does not exist or is not a directory: pass the output "
            "directory of `python -m bf16jax.convert import HF_DIR OUT_DIR`."
        )
    manifest = load_manifest(source)
    pretrained = manifest["model"]
    if pretrained["name"] != config.model.name:
        raise ValueError(
            f"config.init_from={source} holds a {pretrained['name']!r} model but "
            f"config.model.name={config.model.name!r}: use a {pretrained['name']} config."
        )
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in pretrained.items():
        if key in TRAINING_KEYS or key == "name":
            continue
        current = config.model.get(key)
        if current != value:
            log.warning(
                "init_from: model.%s=%r -> %r (the pretrained model's, %s)",
                key,
                current,
                value,
                source,
            )
        if key in config.model:
            config.model[key] = value
        else:
            raise ValueError(
                f"config.model has no key {key!r}, which the pretrained model in {source} sets: "
                "start from bf16jax.config.base_config."
            )
    if config.data.get("tokenizer") == "init_from":
        config.data.tokenizer = source
    config.lock()
    return config
