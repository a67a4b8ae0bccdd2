"""Hugging Face checkpoint files: config translation, tensor names, safetensors directories.

What `bf16jax.interop.convert` needs to read and write a `transformers` model directory without
torch:
`model_config_from_hf(hf_config)` maps a GPT-2 or T5 (v1.0, v1.1 / FLAN-T5, mT5) `config.json`
to a bf16jax `config.model` and refuses anything bf16jax would compute differently, naming the
field and its value; T5 configs in transformers 4.x's and 5.x's forms (`t5_head_is_tied`).
`tensor_map(model_cfg, prefix)` lists every HF tensor with the bf16jax
param path(s) it holds and how (copy, transpose, or GPT-2's fused q|k|v split along its last
axis); each transform is exact, so import -> export is lossless. `read_safetensors` reads a
single `model.safetensors` or a sharded `model.safetensors.index.json` (numpy + ml_dtypes, no
torch) and records the layout (files, tensor order, dtypes, metadata) that `write_safetensors`
reproduces byte for byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "UnsupportedModelError",
    "model_config_from_hf",
    "tensor_map",
    "gpt2_prefix",
    "read_json",
    "t5_head_is_tied",
    "t5_config_for_transformers",
    "installed_transformers",
    "read_safetensors",
    "write_safetensors",
    "SINGLE_FILE",
    "INDEX_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh form bf16jax's "gelu" is
T5_ACTIVATIONS = {"gated-gelu": "gated-gelu", "relu": "relu"}  # feed_forward_proj -> ours


class UnsupportedModelError(ValueError):
    """A config.json or checkpoint that bf16jax cannot represent exactly."""


def read_json(path: str) -> dict:
    """The JSON object in `path`; a missing or malformed file raises naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory has one.")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object.")
    return value


def _refuse(field: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json: {field}={value!r} is not supported: {why}.")


def _get(cfg: Mapping, field: str, default: Any = None, *, required: bool = False) -> Any:
    if field not in cfg or cfg[field] is None:
        if required:
            raise UnsupportedModelError(f"config.json has no {field!r}: it is required.")
        return default
    return cfg[field]


def _expect(cfg: Mapping, field: str, wanted: Any, default: Any, why: str) -> None:
    value = _get(cfg, field, default)
    if value != wanted:
        raise _refuse(field, value, why)


# ----------------------------------------------------------------------------- configs
def model_config_from_hf(cfg: Mapping) -> dict[str, Any]:
    """A bf16jax `config.model` dict for a HF GPT-2 / T5 config.json; refuses the rest.

    Raises:
      UnsupportedModelError: naming the field and value bf16jax cannot represent.
    """
    model_type = _get(cfg, "model_type", required=True)
    if model_type == "gpt2":
        return _gpt2_config(cfg)
    if model_type in ("t5", "mt5"):
        return _t5_config(cfg)
    raise _refuse("model_type", model_type, "bf16jax imports 'gpt2', 't5' and 'mt5'")


def _gpt2_config(cfg: Mapping) -> dict[str, Any]:
    d = int(_get(cfg, "n_embd", required=True))
    act = _get(cfg, "activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise _refuse("activation_function", act, f"use one of {GPT2_ACTIVATIONS} (tanh GELU)")
    _expect(cfg, "scale_attn_weights", True, True, "GPT-2 scales scores by 1/sqrt(head_dim)")
    _expect(cfg, "scale_attn_by_inverse_layer_idx", False, False, "no per-layer score scale")
    _expect(cfg, "add_cross_attention", False, False, "bf16jax's GPT has no cross-attention")
    resid, embd = _get(cfg, "resid_pdrop", 0.1), _get(cfg, "embd_pdrop", 0.1)
    if embd != resid:
        raise _refuse("embd_pdrop", embd, f"bf16jax uses one rate for it and resid_pdrop={resid}")
    return dict(
        name="gpt",
        vocab_size=int(_get(cfg, "vocab_size", required=True)),
        num_layers=int(_get(cfg, "n_layer", required=True)),
        num_heads=int(_get(cfg, "n_head", required=True)),
        embed_dim=d,
        mlp_dim=int(_get(cfg, "n_inner", 4 * d)),
        max_len=int(_get(cfg, "n_positions", required=True)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", True)),
        norm_eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)),
        mlp_activation="gelu",
        dropout_rate=float(resid),
        attention_dropout_rate=float(_get(cfg, "attn_pdrop", 0.1)),
        mlp_dropout_rate=0.0,
        scan_layers=False,
    )


def _t5_config(cfg: Mapping) -> dict[str, Any]:
    proj = _get(cfg, "feed_forward_proj", "relu")
    if proj not in T5_ACTIVATIONS:
        raise _refuse("feed_forward_proj", proj, f"use one of {tuple(T5_ACTIVATIONS)}")
    act = _get(cfg, "dense_act_fn")
    if proj == "gated-gelu" and act not in (None, "gelu_new"):
        raise _refuse("dense_act_fn", act, "gated-gelu means the tanh GELU ('gelu_new')")
    _expect(cfg, "is_encoder_decoder", True, True, "bf16jax's T5 is an encoder-decoder")
    _expect(cfg, "pad_token_id", 0, 0, "bf16jax's T5 pads and masks with id 0")
    _expect(cfg, "decoder_start_token_id", 0, 0, "bf16jax's T5 starts decoding with id 0")
    tied = t5_head_is_tied(cfg)
    layers = int(_get(cfg, "num_layers", required=True))
    rate = float(_get(cfg, "dropout_rate", 0.1))
    return dict(
        name="t5",
        vocab_size=int(_get(cfg, "vocab_size", required=True)),
        embed_dim=int(_get(cfg, "d_model", required=True)),
        num_heads=int(_get(cfg, "num_heads", required=True)),
        head_dim=int(_get(cfg, "d_kv", required=True)),
        mlp_dim=int(_get(cfg, "d_ff", required=True)),
        num_encoder_layers=layers,
        num_decoder_layers=int(_get(cfg, "num_decoder_layers", layers)),
        tie_embeddings=tied,
        relpos_buckets=int(_get(cfg, "relative_attention_num_buckets", 32)),
        relpos_max_distance=int(_get(cfg, "relative_attention_max_distance", 128)),
        norm_eps=float(_get(cfg, "layer_norm_epsilon", 1e-6)),
        mlp_activation=T5_ACTIVATIONS[proj],
        dropout_rate=rate,
        attention_dropout_rate=rate,
        mlp_dropout_rate=rate,
    )


def t5_head_is_tied(cfg: Mapping) -> bool:
    """Whether a T5 config.json's LM head is the shared embedding (rescaled by d_model^-0.5).

    transformers 4.x says it with `tie_word_embeddings` alone (v1.0: true; v1.1 / FLAN-T5:
    false). transformers 5 writes `scale_decoder_outputs` for the head's meaning and
    `tie_word_embeddings: true` (the input embeddings' tie) for FLAN-T5 too; it reads a config
    without `scale_decoder_outputs` the 4.x way. A tied, unscaled head (or the reverse) is not
    a T5 bf16jax can build: refused.
    """
    tie_flag = bool(_get(cfg, "tie_word_embeddings", True))
    if "scale_decoder_outputs" not in cfg:  # the 4.x form
        return tie_flag
    scaled = cfg["scale_decoder_outputs"]
    if not isinstance(scaled, bool):
        raise _refuse("scale_decoder_outputs", scaled, "a JSON true or false")
    if scaled and not tie_flag:
        raise _refuse(
            "scale_decoder_outputs",
            scaled,
            "with tie_word_embeddings=False the head is its own matrix, and bf16jax rescales "
            "the decoder output exactly when the head is the shared embedding",
        )
    return scaled


def t5_config_for_transformers(cfg: Mapping, installed: str | None) -> dict[str, Any]:
    """`cfg` (a T5 config.json) in the form the installed transformers reads as the same model.

    The 4.x form (`tie_word_embeddings` = whether the head is tied, no `scale_decoder_outputs`)
    is read correctly by transformers 4.x and 5.x; the 5.x form (FLAN-T5 with
    `tie_word_embeddings: true`) would make 4.x tie the head. So a 5.x-form config is kept only
    when transformers >= 5 is installed (`installed`: its version, None when absent).
    """
    cfg = dict(cfg)
    tied = t5_head_is_tied(cfg)
    if "scale_decoder_outputs" not in cfg or _major(installed) >= 5:
        return cfg
    if bool(cfg.get("tie_word_embeddings", True)) == tied:
        return cfg  # T5 v1.0's 5.x form: 4.x reads the tie flag alike, ignores the other key
    cfg["tie_word_embeddings"] = tied
    cfg.pop("scale_decoder_outputs")
    return cfg


def _major(version: str | None) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0  # not installed (None) or unparsable: write the form every version reads


def installed_transformers() -> str | None:
    """The installed transformers' version (package metadata; nothing is imported), or None."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- tensor names
# An entry: (HF name, bf16jax param paths, how). "copy": same array; "T": transposed (torch
# Linear [out, in] vs our kernel [in, out]); "split": the HF tensor is our tensors concatenated
# along its last axis (GPT-2's c_attn q|k|v).
Entry = tuple[str, tuple[str, ...], str]


def gpt2_prefix(names: set[str]) -> str:
    """ "transformer." (GPT2LMHeadModel files) or "" (the published gpt2 file, GPT2Model names)."""
    return "transformer." if "transformer.wte.weight" in names else ""


def tensor_map(model_cfg: Mapping, prefix: str = "") -> list[Entry]:
    """Every HF tensor of the model `model_cfg` describes, with the bf16jax params it holds.

    Args:
      model_cfg: a bf16jax `config.model` (from `model_config_from_hf`).
      prefix: GPT-2's name prefix (see `gpt2_prefix`); unused for T5.
    """
    if model_cfg["name"] == "gpt":
        return _gpt2_map(model_cfg, prefix)
    if model_cfg["name"] == "t5":
        return _t5_map(model_cfg)
    raise UnsupportedModelError(f"model.name={model_cfg['name']!r} has no Hugging Face layout.")


def _gpt2_map(m: Mapping, p: str) -> list[Entry]:
    out: list[Entry] = [
        (f"{p}wte.weight", ("embed/embedding",), "copy"),
        (f"{p}wpe.weight", ("pos_embed/embedding",), "copy"),
    ]
    for i in range(m["num_layers"]):
        h, b = f"{p}h.{i}.", f"blocks/{i}/"
        qkv = tuple(f"{b}attn/{x}/" for x in "qkv")
        out += [
            (f"{h}ln_1.weight", (f"{b}norm1/scale",), "copy"),
            (f"{h}ln_1.bias", (f"{b}norm1/bias",), "copy"),
            (f"{h}attn.c_attn.weight", tuple(x + "kernel" for x in qkv), "split"),
            (f"{h}attn.c_attn.bias", tuple(x + "bias" for x in qkv), "split"),
            (f"{h}attn.c_proj.weight", (f"{b}attn/o/kernel",), "copy"),  # Conv1D: x @ W
            (f"{h}attn.c_proj.bias", (f"{b}attn/o/bias",), "copy"),
            (f"{h}ln_2.weight", (f"{b}norm2/scale",), "copy"),
            (f"{h}ln_2.bias", (f"{b}norm2/bias",), "copy"),
            (f"{h}mlp.c_fc.weight", (f"{b}mlp/fc1/kernel",), "copy"),
            (f"{h}mlp.c_fc.bias", (f"{b}mlp/fc1/bias",), "copy"),
            (f"{h}mlp.c_proj.weight", (f"{b}mlp/fc2/kernel",), "copy"),
            (f"{h}mlp.c_proj.bias", (f"{b}mlp/fc2/bias",), "copy"),
        ]
    out += [
        (f"{p}ln_f.weight", ("norm_f/scale",), "copy"),
        (f"{p}ln_f.bias", ("norm_f/bias",), "copy"),
    ]
    if not m.get("tie_embeddings", True):
        out.append(("lm_head.weight", ("head/kernel",), "T"))
    return out


def _t5_map(m: Mapping) -> list[Entry]:
    out: list[Entry] = [("shared.weight", ("embed/embedding",), "copy")]
    gated = m["mlp_activation"].startswith("gated-")
    mlp = (
        (("wi_0", "wi_0"), ("wi_1", "wi_1"), ("wo", "wo"))
        if gated
        else (("wi", "fc1"), ("wo", "fc2"))
    )
    for stack, n in (("encoder", m["num_encoder_layers"]), ("decoder", m["num_decoder_layers"])):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out.append((rel, (f"{stack}/relpos/embedding",), "copy"))
        subs = [("SelfAttention", "self_attn")]
        if stack == "decoder":
            subs.append(("EncDecAttention", "cross_attn"))
        for i in range(n):
            h, b = f"{stack}.block.{i}.layer.", f"{stack}/layers/{i}/"
            for j, (theirs, ours) in enumerate(subs):
                for x in "qkvo":
                    out.append((f"{h}{j}.{theirs}.{x}.weight", (f"{b}{ours}/{x}/kernel",), "T"))
                out.append((f"{h}{j}.layer_norm.weight", (f"{b}{ours}_norm/scale",), "copy"))
            j = len(subs)
            for theirs, ours in mlp:
                out.append(
                    (f"{h}{j}.DenseReluDense.{theirs}.weight", (f"{b}mlp/{ours}/kernel",), "T")
                )
            out.append((f"{h}{j}.layer_norm.weight", (f"{b}mlp_norm/scale",), "copy"))
        out.append((f"{stack}.final_layer_norm.weight", (f"{stack}/norm/scale",), "copy"))
    if not m["tie_embeddings"]:
        out.append(("lm_head.weight", ("head/kernel",), "T"))
    return out


def aliases(model_cfg: Mapping) -> tuple[str, ...]:
    """HF names that may hold a copy of the shared embedding (tied weights written twice)."""
    if model_cfg["name"] == "t5":
        names = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        return names + (("lm_head.weight",) if model_cfg["tie_embeddings"] else ())
    return ("lm_head.weight",) if model_cfg.get("tie_embeddings", True) else ()


def buffer_names(model_cfg: Mapping, prefix: str) -> tuple[str, ...]:
    """Non-parameter tensors old files carry (GPT-2's causal masks): kept, never used."""
    if model_cfg["name"] != "gpt":
        return ()
    return tuple(
        f"{prefix}h.{i}.attn.{b}"
        for i in range(model_cfg["num_layers"])
        for b in ("bias", "masked_bias")
    )


def to_params(entry: Entry, value: np.ndarray) -> dict[str, np.ndarray]:
    """The bf16jax param(s) held by one HF tensor (see `Entry`)."""
    _, paths, how = entry
    if how == "copy":
        return {paths[0]: value}
    if how == "T":
        return {paths[0]: np.ascontiguousarray(value.T)}
    parts = np.split(value, len(paths), axis=-1)
    return {p: np.ascontiguousarray(x) for p, x in zip(paths, parts, strict=True)}


def from_params(entry: Entry, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """The HF tensor of one entry, rebuilt from bf16jax params (inverse of `to_params`)."""
    _, paths, how = entry
    if how == "copy":
        return np.ascontiguousarray(params[paths[0]])
    if how == "T":
        return np.ascontiguousarray(params[paths[0]].T)
    return np.concatenate([params[p] for p in paths], axis=-1)


# ----------------------------------------------------------------------------- safetensors
def read_safetensors(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a HF directory's safetensors file(s) as numpy, and their layout.

    Returns:
      (tensors by name, layout): layout = {"files": {file: [names in file order]},
      "metadata": {file: header metadata}, "dtypes": {name: "F32"|"BF16"|...}, "index": the
      index file's text or None}; `write_safetensors` writes the same files from it.

    Raises:
      FileNotFoundError / ValueError: no safetensors file (a torch-only `pytorch_model.bin`
        included), a shard the index names but the directory lacks, or a malformed file.
    """
    from safetensors import SafetensorError, safe_open

    single = os.path.join(directory, SINGLE_FILE)
    index_path = os.path.join(directory, INDEX_FILE)
    index_text = None
    if os.path.isfile(single):
        files = [SINGLE_FILE]
    elif os.path.isfile(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' of tensor -> shard file.")
        files = sorted(set(weight_map.values()))
        with open(index_path, encoding="utf-8") as f:
            index_text = f.read()
    else:
        present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        hint = (
            " It holds a torch pickle (pytorch_model.bin): save it as safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))."
            if "pytorch_model.bin" in present
            else ""
        )
        raise FileNotFoundError(
            f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {present}).{hint}"
        )
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {"files": {}, "metadata": {}, "dtypes": {}, "index": index_text}
    for file in files:
        path = os.path.join(directory, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing.")
        try:
            with safe_open(path, "np") as f:
                names = list(f.keys())
                layout["metadata"][file] = f.metadata()
                for name in names:
                    layout["dtypes"][name] = f.get_slice(name).get_dtype()
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
        layout["files"][file] = names
    return tensors, layout


_NP_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def numpy_dtype(code: str) -> np.dtype:
    """numpy dtype of a safetensors dtype code ("F32", "BF16", ...)."""
    if code not in _NP_DTYPES:
        raise ValueError(f"safetensors dtype {code!r} is not a float dtype bf16jax writes.")
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    return np.dtype(ml_dtypes.bfloat16) if code == "BF16" else np.dtype(_NP_DTYPES[code])


def write_safetensors(directory: str, tensors: Mapping[str, np.ndarray], layout: Mapping) -> None:
    """Writes `tensors` into the files of `layout` (as `read_safetensors` returned it).

    Each tensor takes its recorded dtype; the index file is written back verbatim when the
    total size is unchanged, else regenerated as transformers writes it.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    total = 0
    for file, names in layout["files"].items():
        chunk = {}
        for name in names:
            chunk[name] = np.ascontiguousarray(tensors[name]).astype(
                numpy_dtype(layout["dtypes"][name]), copy=False
            )
            total += chunk[name].nbytes
        save_file(chunk, os.path.join(directory, file), metadata=layout["metadata"][file])
    if layout["index"] is not None:
        text = layout["index"]
        index = json.loads(text)
        if index.get("metadata", {}).get("total_size", total) != total:
            index["metadata"]["total_size"] = total
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            f.write(text)
