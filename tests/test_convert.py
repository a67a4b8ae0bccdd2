"""bf16jax.interop.convert / bf16jax.interop.hf against transformers' own outputs (tests/golden, no
torch here).

The golden directories hold small random GPT-2, FLAN-T5-shaped (T5 v1.1) and T5 v1.0 checkpoints
written by transformers, and the logits transformers computed for fixed inputs
(tests/golden/make_golden.py, run by hand). Each is imported, run under FP32 (must agree to
1e-4 relative) and BF16 (agreement printed, loose bounds), and exported back byte for byte.
"""

import filecmp
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bf16jax import convert as convert_cmd
from bf16jax.interop import convert, hf
from bf16jax.models import build_model

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FAMILIES = ("gpt2", "t5_v1_1", "t5_v1_0")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each golden directory imported once under fp32: {family: converted dir}."""
    root = tmp_path_factory.mktemp("converted")
    for family in FAMILIES:
        convert.import_hf(os.path.join(GOLDEN, family), str(root / family), precision="fp32")
    return {family: root / family for family in FAMILIES}


def _logits(directory, policy: str, family: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ours, transformers') logits for the golden inputs (of `family`, default the directory's
    name), ours under `policy`."""
    manifest = convert.load_manifest(str(directory))
    abstract = convert.abstract_params(manifest["model"], policy)
    params = convert.restore_params(str(directory), convert._placed(abstract))
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: build_model(manifest["model"], policy, rngs=nnx.Rngs(0))),
        nnx.Param,
    )
    model = nnx.merge(graphdef, params)
    ref = np.load(os.path.join(GOLDEN, family or directory.name, "reference.npz"))
    if "input_ids" in ref:
        ours = model(jnp.asarray(ref["input_ids"]))
    else:
        ours = model(jnp.asarray(ref["encoder_input_ids"]), jnp.asarray(ref["decoder_input_ids"]))
    assert ours.dtype == jnp.float32  # FP32 logits island under every policy
    return np.asarray(ours), ref["logits"]


def _relative(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_match_transformers(converted, family):
    ours, ref = _logits(converted[family], "fp32")
    assert ours.shape == ref.shape
    err = _relative(ours, ref)
    print(f"{family}: FP32 max |logit error| / max |logit| = {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_agreement_with_transformers(converted, family):
    ours, ref = _logits(converted[family], "bf16")
    err = _relative(ours, ref)
    top1 = float(np.mean(np.argmax(ours, -1) == np.argmax(ref, -1)))
    print(f"{family}: BF16 relative error {err:.2e}, top-1 agreement {top1:.1%}")
    # BF16 keeps 8 bits: errors of 1e-2 relative are expected, a wrong mapping gives ~1.
    assert err < 5e-2 and top1 >= 0.85


def test_gpt2_scan_layers_matches(converted):
    """The converted GPT-2 also runs with stacked (scanned) layers: the same logits."""
    manifest = convert.load_manifest(str(converted["gpt2"]))
    ref_logits, _ = _logits(converted["gpt2"], "fp32")
    cfg = dict(manifest["model"], scan_layers=True)
    model = build_model(cfg, "fp32", rngs=nnx.Rngs(0))
    flat = convert._flat(
        convert.restore_params(
            str(converted["gpt2"]), convert._placed(convert.abstract_params(manifest["model"]))
        )
    )
    stacked = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(stacked):
        key = "/".join(map(str, path))
        if key.startswith("blocks/"):
            rest = key.removeprefix("blocks/")
            layers = [flat[f"blocks/{i}/{rest}"] for i in range(cfg["num_layers"])]
            var.set_value(jnp.asarray(np.stack(layers)))
        else:
            var.set_value(jnp.asarray(flat[key]))
    nnx.update(model, stacked)
    ref = np.load(os.path.join(GOLDEN, "gpt2", "reference.npz"))
    ours = np.asarray(model(jnp.asarray(ref["input_ids"])))
    assert _relative(ours, ref_logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_is_byte_identical(converted, family, tmp_path):
    out = tmp_path / "hf"
    convert.export_hf(str(converted[family]), str(out))
    source = os.path.join(GOLDEN, family)
    written = sorted(os.listdir(out))
    weights = [f for f in written if "safetensors" in f]
    assert weights and "config.json" in written
    for name in written:
        assert filecmp.cmp(out / name, os.path.join(source, name), shallow=False), name


def _t5_forms(tmp_path):
    """The golden T5s with config.json in transformers 4.x's and 5.x's forms: {name: dir}."""
    forms = {}
    for family, form, edit in (
        ("t5_v1_1", "5.x", "config.transformers5.json"),  # tie true + scale false: untied
        ("t5_v1_0", "4.x", None),  # scale_decoder_outputs dropped: tied by the 4.x flag alone
    ):
        directory = _copy_golden(family, tmp_path / f"{family}-{form}")
        cfg = json.loads(open(os.path.join(GOLDEN, family, "config.json")).read())
        if edit:
            cfg = json.loads(open(os.path.join(GOLDEN, family, edit)).read())
        else:
            cfg.pop("scale_decoder_outputs")
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        forms[f"{family}-{form}"] = directory
    return forms


def test_both_transformers_config_forms_import(tmp_path, monkeypatch):
    """transformers 5 writes FLAN-T5 as tie_word_embeddings=true + scale_decoder_outputs=false
    (refused before: 'scale_decoder_outputs=False is not supported'); it imports as the
    untied head it is, computes transformers' logits, and exports in the form the installed
    transformers reads: the 4.x form without transformers (or with 4.x), as is with 5.x."""
    expected = {  # installed transformers -> the config.json export writes
        "t5_v1_1-5.x": {
            None: "config.json",
            "4.57.0": "config.json",
            "5.24.0": "config.transformers5.json",
        },  # fmt: skip
        "t5_v1_0-4.x": dict.fromkeys((None, "4.57.0", "5.24.0"), "as imported"),
    }
    for name, directory in _t5_forms(tmp_path).items():
        family = name.split("-")[0]
        out = tmp_path / f"{name}-converted"
        manifest = convert.import_hf(directory, str(out), precision="fp32")
        assert manifest["model"]["tie_embeddings"] == (family == "t5_v1_0")
        ours, ref = _logits(out, "fp32", family)
        assert _relative(ours, ref) < 1e-4, name
        for installed, expect in expected[name].items():
            monkeypatch.setattr(hf, "installed_transformers", lambda v=installed: v)
            back = tmp_path / f"{name}-{installed}"
            convert.export_hf(str(out), str(back))
            want = os.path.join(directory, "config.json")
            if expect != "as imported":
                want = os.path.join(GOLDEN, family, expect)
            assert filecmp.cmp(back / "config.json", want, shallow=False), (name, installed)
            for weights in (f for f in os.listdir(back) if "safetensors" in f):
                source = os.path.join(GOLDEN, family, weights)
                assert filecmp.cmp(back / weights, source, shallow=False), weights


def test_unsupported_t5_head_is_refused(tmp_path):
    directory = _copy_golden("t5_v1_1", tmp_path / "m")
    _edit_config(directory, tie_word_embeddings=False, scale_decoder_outputs=True)
    with pytest.raises(hf.UnsupportedModelError, match="scale_decoder_outputs=True"):
        convert.import_hf(directory, str(tmp_path / "out"))


def test_bf16_import_casts_and_exports_the_rounded_values(tmp_path):
    src = os.path.join(GOLDEN, "t5_v1_1")
    manifest = convert.import_hf(src, str(tmp_path / "c"), precision="bf16-pure")
    assert manifest["precision"].startswith("p=bf16")
    abstract = convert.abstract_params(manifest["model"], "bf16-pure")
    params = convert._flat(convert.restore_params(str(tmp_path / "c"), convert._placed(abstract)))
    assert params["embed/embedding"].dtype == jnp.bfloat16
    convert.export_hf(str(tmp_path / "c"), str(tmp_path / "hf"))
    original, _ = hf.read_safetensors(src)
    exported, layout = hf.read_safetensors(str(tmp_path / "hf"))
    assert layout["dtypes"]["shared.weight"] == "F32"  # the file keeps its dtype
    rounded = original["shared.weight"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(exported["shared.weight"], rounded)


# ----------------------------------------------------------------------------- refusals
def _copy_golden(family: str, dst) -> str:
    shutil.copytree(os.path.join(GOLDEN, family), dst)
    return str(dst)


def _edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    cfg = json.loads(open(path).read())
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("t5_v1_1", "feed_forward_proj", "gated-silu"),
        ("t5_v1_1", "model_type", "bert"),
        ("t5_v1_1", "pad_token_id", 3),
        ("gpt2", "activation_function", "relu"),
        ("gpt2", "embd_pdrop", 0.3),
        ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ],
)
def test_unsupported_configs_are_refused_naming_field_and_value(tmp_path, family, field, value):
    directory = _copy_golden(family, tmp_path / "m")
    _edit_config(directory, **{field: value})
    with pytest.raises(hf.UnsupportedModelError, match=f"{field}={value!r}"):
        convert.import_hf(directory, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_missing_and_malformed_files_are_named(tmp_path):
    directory = _copy_golden("t5_v1_1", tmp_path / "m")
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        convert.import_hf(directory, str(tmp_path / "o1"))
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert.import_hf(directory, str(tmp_path / "o2"))

    directory = _copy_golden("gpt2", tmp_path / "g")
    os.rename(os.path.join(directory, "model.safetensors"), os.path.join(directory, "x"))
    open(os.path.join(directory, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors first"):
        convert.import_hf(directory, str(tmp_path / "o3"))
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken header}")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        convert.import_hf(directory, str(tmp_path / "o4"))

    directory = _copy_golden("t5_v1_0", tmp_path / "s")
    os.remove(os.path.join(directory, "model-00003-of-00012.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00003-of-00012.safetensors is listed"):
        convert.import_hf(directory, str(tmp_path / "o5"))


def test_missing_or_unknown_tensors_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = _copy_golden("t5_v1_1", tmp_path / "m")
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    save_file({**tensors, "encoder.extra.weight": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match="'encoder.extra.weight' is not part of the t5 model"):
        convert.import_hf(directory, str(tmp_path / "o1"))
    tensors.pop("lm_head.weight")
    save_file(tensors, path)
    with pytest.raises(ValueError, match="no tensor 'lm_head.weight'"):
        convert.import_hf(directory, str(tmp_path / "o2"))


def test_export_needs_a_converted_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="bf16jax.json not found"):
        convert.export_hf(str(tmp_path), str(tmp_path / "out"))


def test_cli_import_export(tmp_path, capsys):
    out, back = str(tmp_path / "c"), str(tmp_path / "hf")
    assert convert_cmd.main(["import", os.path.join(GOLDEN, "gpt2"), out, "--precision=fp32"]) == 0
    capsys.readouterr()
    assert convert_cmd.main(["export", out, back]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # what it wrote
    assert said["exported"] == back and said["params_from"] == out
    assert said["files"] == sorted(os.listdir(back)) and "model.safetensors" in said["files"]
    assert filecmp.cmp(
        os.path.join(back, "model.safetensors"),
        os.path.join(GOLDEN, "gpt2", "model.safetensors"),
        shallow=False,
    )
    assert convert_cmd.main(["import", os.path.join(GOLDEN, "gpt2"), out]) == 2  # not empty
