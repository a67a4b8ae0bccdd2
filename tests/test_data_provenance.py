"""Every tool reads the model's own data (bf16jax.data.provenance, serving.scoring.resolve_data):
the record in config.json, a rewritten corpus or a config naming other data refused, `--data`
measured knowingly and reported, and packed eval rows scored one document per row
(serving.segments). Small generated corpora; a BPE tokenizer trained here offline."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from prepared_corpus import make_docs, run, train_bpe, write_jsonl

from bf16jax.config import base_config
from bf16jax.data import datasets as data_lib
from bf16jax.data import provenance
from bf16jax.models import build_model
from bf16jax.serving import scoring, segments
from bf16jax.training import workdir


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe"), 300, vocab_size=300)


def gpt_cfg(path, **data):
    c = base_config("gpt")
    c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=32)
    c.model.vocab_size = 320
    c.data.update(name="prepared", path=str(path), seq_len=32, batch_size=4, eval_batch_size=4)
    c.data.update(**data)
    return c


def test_tools_measure_the_runs_own_data_and_refuse_another(tmp_path, bpe_dir):
    write_jsonl(tmp_path / "a.jsonl", make_docs(80))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", tokenizer=str(bpe_dir), eval_docs=20)
    c = gpt_cfg(tmp_path / "ds")
    workdir.write_config(c, str(tmp_path / "run"))
    trained = workdir.trained_data(str(tmp_path / "run"))
    assert trained["sources"][0]["tokenizer"]["kind"] == "bpe"
    saved = workdir.read_config(str(tmp_path / "run"))  # what evaluate --workdir resolves
    config, report = scoring.resolve_data(saved, trained)
    assert report["same_as_training"] is True and report["measured"] == trained
    line = scoring.data_line(report)
    assert str(tmp_path / "ds") in line and trained["sources"][0]["meta_sha256"][:12] in line
    # A config naming the bundled KJV bytes for a run trained on the user's text: refused.
    with pytest.raises(ValueError, match="the model trained on prepared .* this reads kjv_bytes"):
        scoring.resolve_data(base_config("gpt"), trained)
    # The same path holding another corpus: refused, naming the two metadata hashes.
    shutil.rmtree(tmp_path / "ds")
    write_jsonl(tmp_path / "a.jsonl", make_docs(81))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", tokenizer=str(bpe_dir), eval_docs=20)
    new_hash = provenance.describe(c.data)["sources"][0]["meta_sha256"]
    with pytest.raises(
        ValueError, match=f"changed since the model trained on it .*{new_hash[:12]}"
    ):
        scoring.resolve_data(saved, trained)
    # --data: measured knowingly, and the report says it is not the training data.
    config, report = scoring.resolve_data(saved, trained, str(tmp_path / "ds"))
    assert report["same_as_training"] is False and config.data.path == str(tmp_path / "ds")
    assert "NOT the model's training data" in scoring.data_line(report)
    # --data tokenized with another tokenizer (bytes): refused.
    run([tmp_path / "a.jsonl"], tmp_path / "bytes", eval_docs=20)
    with pytest.raises(ValueError, match="another tokenizer than the model's training data"):
        scoring.resolve_data(saved, trained, str(tmp_path / "bytes"))


def test_bundled_training_data_and_data_checked_against_the_model(tmp_path, bpe_dir):
    c = base_config("gpt")
    trained = provenance.describe(c.data)
    assert trained == {"name": "kjv_bytes", "tokenizer": "bytes"}
    assert provenance.describe_saved(c.to_dict()) == trained
    _, report = scoring.resolve_data(c, None)  # nothing recorded: measured, said so
    assert report["same_as_training"] is None and "not recorded" in scoring.data_line(report)
    write_jsonl(tmp_path / "a.jsonl", make_docs(30))
    run([tmp_path / "a.jsonl"], tmp_path / "bytes", eval_docs=5)
    run([tmp_path / "a.jsonl"], tmp_path / "bpe", tokenizer=str(bpe_dir), eval_docs=5)
    _, report = scoring.resolve_data(c, trained, str(tmp_path / "bytes"))
    assert report["same_as_training"] is False
    with pytest.raises(ValueError, match="tokenized with a bpe tokenizer, the model with bytes"):
        scoring.resolve_data(c, trained, str(tmp_path / "bpe"))
    c.model.vocab_size = 200
    with pytest.raises(ValueError, match="exceeds the model's embedding .*vocab_size=200"):
        scoring.resolve_data(c, trained, str(tmp_path / "bytes"))


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_packed_rows_score_as_their_documents_alone(tmp_path, family):
    if family == "gpt":
        rows = [{"prompt": f"Q{i}: " + "x" * (i % 7), "completion": f" A{i}"} for i in range(40)]
        kind, c = "prompt_completion", gpt_cfg(tmp_path / "ds")
        c.model.vocab_size = 300
    else:
        rows = [{"input": f"in {i} " + "z" * (i % 5), "target": f"out {i}"} for i in range(40)]
        kind, c = "text2text", base_config("t5")
        c.model.update(embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64)
        c.model.update(num_encoder_layers=1, num_decoder_layers=1, vocab_size=300)
        c.data.update(name="prepared", path=str(tmp_path / "ds"), batch_size=4)
        c.data.update(eval_batch_size=4, enc_len=32, dec_len=16)
    import json

    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([tmp_path / "x.jsonl"], tmp_path / "ds", kind=kind, eval_docs=16)
    model = build_model(c.model, "fp32", rngs=nnx.Rngs(0))
    fn = jax.jit(lambda *a: model(*a))

    def stats(packing: bool, unpack: bool = True):
        cfg = c.copy_and_resolve_references()
        cfg.data.packing, cfg.data.eval_batch_size = packing, 1  # no row left out
        scorer = scoring.Scorer(cfg, fn, {"seq_len": 32, "enc_len": 32, "decode_len": 16}, {})
        out = []
        for b in data_lib.make_dataset(cfg.data, "eval", model=family):
            if not unpack:
                b = {k: v for k, v in b.items() if "segment" not in k and "position" not in k}
            s = scorer.predict(None, b)
            out.append(np.stack([s["nll"][s["weight"] > 0], s["weight"][s["weight"] > 0]]))
        return np.concatenate(out, axis=1)

    plain, packed = stats(False), stats(True)
    assert packed.shape == plain.shape  # the same weighted tokens, in the same order
    np.testing.assert_allclose(packed, plain, rtol=1e-4, atol=1e-5)
    leaked = stats(True, unpack=False)  # the row read whole: documents see each other
    assert np.abs(leaked - plain).max() > 1e-2


def test_unpacked_logits_put_each_segment_back():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    x = np.arange(12, dtype=np.int32).reshape(2, 6) + 1
    calls = []

    def fn(rows):  # logit 0 = the token, logit 1 = its position in its row
        calls.append(rows.shape)
        pos = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
        return np.stack([rows, pos], -1).astype(np.float32)

    out = segments.unpacked_logits(fn, {"segment_ids": seg, "inputs": x}, 6)
    np.testing.assert_array_equal(out[..., 0], x * (seg > 0))
    np.testing.assert_array_equal(out[..., 1], [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    assert calls == [(2, 6), (2, 6)]  # 3 documents, in calls of the batch's size


@pytest.mark.slow
def test_commands_measure_the_runs_own_corpus_and_refuse_a_rewritten_one(tmp_path, bpe_dir):
    """prepare (a BPE trained here) -> main -> evaluate / export / gate through `python -m`:
    each names the run's prepared data; the corpus rewritten at the same path is refused (exit
    2, nothing written), a bundled set named by --config too; --data measures it knowingly."""
    import json

    from cli_runs import TINY_OVERRIDES, run_main, run_python

    from bf16jax.serving import artifact

    def prepare(n):
        write_jsonl(tmp_path / "a.jsonl", make_docs(n))
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        proc = run_python("-m", "bf16jax.prepare", str(tmp_path / "a.jsonl"),
                          f"--out={tmp_path / 'ds'}", f"--tokenizer={bpe_dir}", "--eval_docs=40",
                          "--no_progress")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return provenance.describe(gpt_cfg(tmp_path / "ds").data)["sources"][0]["meta_sha256"]

    meta = prepare(300)
    run = tmp_path / "run"
    proc = run_main("--config=configs/gpt_tiny.py", *TINY_OVERRIDES["gpt_tiny"],
                    "--config.data.name=prepared", f"--config.data.path={tmp_path / 'ds'}",
                    "--config.train.steps=2", "--config.train.eval_steps=1",
                    "--config.train.sample_tokens=0", f"--workdir={run}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tool = ("--num_batches=1", "--reference=none")
    proc = run_python("-m", "bf16jax.evaluate", f"--workdir={run}", *tool)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["data"]["same_as_training"] is True
    assert report["data"]["measured"]["sources"][0]["meta_sha256"] == meta
    assert f"data: prepared {tmp_path / 'ds'} (meta {meta[:12]}, tokenizer bpe)" in proc.stderr
    art = tmp_path / "art"
    proc = run_python("-m", "bf16jax.export", f"--workdir={run}", f"--out={art}",
                      "--precision=fp32", "--platforms=cpu", "--eval_batches=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = artifact.verify(str(art))  # manifest.sha256 still covers the manifest
    assert manifest["data"]["trained"]["sources"][0]["meta_sha256"] == meta
    assert manifest["metrics"]["data"]["same_as_training"] is True
    # A bundled set named by --config for this run: refused before any model loads.
    proc = run_python("-m", "bf16jax.evaluate", "--config=configs/gpt_tiny.py", f"--workdir={run}",
                      *tool)  # fmt: skip
    assert proc.returncode == 2 and "this reads kjv_bytes" in proc.stderr, proc.stderr[-2000:]
    # The corpus rewritten at the same path: every tool refuses, naming the new hash.
    new = prepare(301)
    for args in (("bf16jax.evaluate", f"--workdir={run}", *tool),
                 ("bf16jax.evaluate", f"--artifact={art}", *tool),
                 ("bf16jax.gate", f"--candidate={art}", f"--reference={art}", "--num_batches=1"),
                 ("bf16jax.export", f"--workdir={run}", f"--out={tmp_path / 'art2'}")):  # fmt: skip
        proc = run_python("-m", *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "changed since the model trained on it" in proc.stderr and new[:12] in proc.stderr
    assert not (tmp_path / "art2").exists()
    proc = run_python("-m", "bf16jax.evaluate", f"--artifact={art}", *tool,
                      f"--data={tmp_path / 'ds'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["data"]["same_as_training"] is False
    assert "NOT the model's training data" in proc.stderr
