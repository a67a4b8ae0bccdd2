"""Training examples from prepared datasets (bf16jax.data.readers / mixture, data.name="prepared"):
the contract's features and their values, sentinels, resume, process shards, mixtures, and the
start-up checks. Model outputs are not checked here (the models' own tests do)."""

import io
import json
import os

import numpy as np
import pytest
from prepared_corpus import make_docs, run, train_bpe, write_jsonl

from bf16jax.config import base_config
from bf16jax.data import datasets as data_lib
from bf16jax.data import prepare as prep
from bf16jax.data import prepared as fmt
from bf16jax.data import readers, span_plan
from bf16jax.data.tokenizer import load_tokenizer, sentinel_ids
from bf16jax.training import preflight, workdir

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    write_jsonl(root / "a.jsonl", make_docs(200))
    run([root / "a.jsonl"], root / "ds", eval_fraction=0.2, shard_tokens=2000)
    return root / "ds"


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text for _, text in data_lib.kjv_verses("train")[:2000]),
        model_writer=buf,
        vocab_size=150,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="identity",
        minloglevel=2,
        num_threads=1,
    )
    path = tmp_path_factory.mktemp("spm")
    (path / "spiece.model").write_bytes(buf.getvalue())
    return path


def cfg(model, path, **data):
    c = base_config(model)
    c.data.update(name="prepared", path=str(path), batch_size=4, eval_batch_size=4)
    c.data.update(seq_len=32, enc_len=32, dec_len=12)
    c.data.update(**data)
    return c


def batches(c, split="train", n=3, **kw):
    it = iter(data_lib.make_dataset(c.data, split, model=c.model.name, **kw))
    return [next(it) for _ in range(n)]


def stream_of(path, field="text"):
    ds = fmt.open_dataset(str(path))
    s = readers.TokenStream(ds.shards("train"), field)
    starts = np.concatenate(
        [np.asarray(o[:-1]) + b for o, b in zip(s.offsets, s.bases[:-1], strict=True)]
    )
    return s.read(0, len(s)), starts


def test_gpt_windows_cover_the_document_stream(text_dir):
    c = cfg("gpt", text_dir)
    tokens, starts = stream_of(text_dir)
    ex = readers.build_examples(fmt.open_dataset(str(text_dir)), "gpt", "train", c.data, 0)
    assert len(ex) == (len(tokens) - 1) // 32
    for i in (0, 1, len(ex) - 1):  # the last windows cross shard files
        row = ex[i]
        np.testing.assert_array_equal(row["inputs"], tokens[i * 32 : i * 32 + 32])
        np.testing.assert_array_equal(row["targets"], tokens[i * 32 + 1 : i * 32 + 33])
    assert (tokens[starts[1:] - 1] == 1).all()  # EOS before every document


def test_gpt_packing_segments_positions_and_weights(text_dir):
    c = cfg("gpt", text_dir, packing=True)
    tokens, starts = stream_of(text_dir)
    is_start = np.zeros(len(tokens) + 1, bool)
    is_start[starts] = True
    ex = readers.build_examples(fmt.open_dataset(str(text_dir)), "gpt", "train", c.data, 0)
    crossings = 0
    for i in range(len(ex)):
        row, lo = ex[i], i * 32
        seg, pos, w = row["segment_ids"], row["positions"], row["weights"]
        new = is_start[lo : lo + 32].copy()
        new[0] = True  # a row starts a segment
        np.testing.assert_array_equal(seg, np.cumsum(new))
        for j in range(32):  # positions count from each segment's first token
            first = max(k for k in range(j + 1) if new[k])
            assert pos[j] == j - first
        # Weight 0 exactly where the target starts the next document.
        np.testing.assert_array_equal(w == 0, is_start[lo + 1 : lo + 33])
        crossings += int((w == 0).sum())
    assert crossings > 50
    spec = data_lib.example_spec(c.data, "gpt")
    b = batches(c, n=1)[0]
    assert {k: (v.shape[1:], v.dtype) for k, v in b.items()} == spec


def test_sentinels_are_the_tokenizers_own(spm_dir):
    tok = load_tokenizer(str(spm_dir))
    assert sentinel_ids(tok)[:3].tolist() == [249, 248, 247]  # 150 pieces + 100, counting down
    golden = load_tokenizer(os.path.join(GOLDEN, "t5_v1_1"))
    added = json.load(open(os.path.join(GOLDEN, "t5_v1_1", "tokenizer.json")))["added_tokens"]
    hf = {t["content"]: t["id"] for t in added}  # what transformers' T5 tokenizer gives
    ids = sentinel_ids(golden)
    assert len(ids) == 100
    assert [hf[f"<extra_id_{i}>"] for i in range(100)] == ids.tolist()
    assert sentinel_ids(load_tokenizer(""))[:2].tolist() == [258, 259]


@pytest.mark.parametrize("packing", [False, True])
def test_t5_span_corruption_with_sentencepiece_sentinels(spm_dir, tmp_path, packing):
    # Long documents (several chunks each) and short ones (several to a row when packed).
    docs = make_docs(60, seed=3) + [d[:12] for d in make_docs(60, seed=4)]
    write_jsonl(tmp_path / "a.jsonl", docs)
    run([tmp_path / "a.jsonl"], tmp_path / "ds", tokenizer=str(spm_dir), eval_docs=10)
    c = cfg("t5", tmp_path / "ds", packing=packing)
    tok = load_tokenizer(str(spm_dir))
    sentinels = sentinel_ids(tok).tolist()
    rows = [
        r
        for b in batches(c, n=4)
        for r in (dict(zip(b, v, strict=True)) for v in zip(*b.values(), strict=True))
    ]
    for r in rows:
        enc, tgt, dec = r["encoder_inputs"], r["targets"], r["decoder_inputs"]
        eseg = r.get("encoder_segment_ids", (enc != 0).astype(np.int32))
        dseg = r.get("decoder_segment_ids", (tgt != 0).astype(np.int32))
        for k in np.unique(eseg[eseg > 0]):
            e, t = enc[eseg == k], tgt[dseg == k]
            used = [x for x in e.tolist() if x >= tok.pieces]
            assert used == sentinels[: len(used)] and used  # <extra_id_0>, <extra_id_1>, ...
            assert t[0] == sentinels[0] and t[-1] == e[-1] == tok.eos_id
            d = dec[dseg == k]
            assert d[0] == 0 and (d[1:] == t[:-1]).all()  # shifted within the segment
        np.testing.assert_array_equal(r["weights"], (dseg > 0).astype(np.float32))
        if packing:
            assert set(np.unique(eseg)) - {0} == set(np.unique(dseg)) - {0}
            for seg, pos in ((eseg, r["encoder_positions"]), (dseg, r["decoder_positions"])):
                for k in np.unique(seg[seg > 0]):
                    np.testing.assert_array_equal(pos[seg == k], np.arange((seg == k).sum()))
    if packing:  # the short documents share rows
        ex = readers.build_examples(
            fmt.open_dataset(str(tmp_path / "ds")), "t5", "train", c.data, 0
        )
        assert max(len(starts) for starts, _ in (ex[r] for r in range(len(ex)))) >= 2


def test_t5_span_refuses_a_tokenizer_without_sentinels(tmp_path):
    train_bpe(tmp_path / "bpe", 50, vocab_size=280, seed=0)
    write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", tokenizer=str(tmp_path / "bpe"), eval_docs=5)
    with pytest.raises(ValueError, match="needs sentinel tokens"):
        batches(cfg("t5", tmp_path / "ds"), n=1)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    rows = [
        {"prompt": f"Q{i}: " + "x" * (i % 7), "completion": f" A{i}" + "y" * (i % 5)}
        for i in range(60)
    ]
    rows.append({"prompt": "long " * 40, "completion": "z"})  # longer than any row: split
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "qa.jsonl"


@pytest.mark.parametrize("packing", [False, True])
def test_prompt_completion_loss_on_completion_only(qa_file, tmp_path, packing):
    run([qa_file], tmp_path / "pc", kind="prompt_completion")
    c = cfg("gpt", tmp_path / "pc", packing=packing)
    ex = readers.build_examples(fmt.open_dataset(str(tmp_path / "pc")), "gpt", "train", c.data, 0)
    assert ex.skipped == 0 and ex.split == 1  # the long one, split across windows
    tok = load_tokenizer("")
    seen = set()
    for i in range(len(ex)):
        r = ex[i]
        seg = r["segment_ids"] if packing else (r["inputs"] != 0).astype(np.int32)
        for k in np.unique(seg[seg > 0]):
            m = seg == k
            full = tok.decode(np.append(r["inputs"][m][:1], r["targets"][m]))
            weighted = r["targets"][m][r["weights"][m] > 0]
            completion = tok.decode(weighted)
            if "long" in full:  # its one window: the prompt's tail as context
                assert completion == "z" and weighted[-1] == tok.eos_id and len(m) == 32
                seen.add("long")
                continue
            n = int(full.split(":")[0][1:])
            assert completion == f" A{n}" + "y" * (n % 5)  # exactly the completion, + EOS
            assert full == f"Q{n}: " + "x" * (n % 7) + completion and weighted[-1] == tok.eos_id
            seen.add(n)
    assert seen == set(range(60)) | {"long"}
    if packing:
        assert len(ex) < 40  # several examples per row (60 unpacked)
        assert "positions" in ex[0]


@pytest.mark.parametrize("packing", [False, True])
def test_long_completions_are_split_across_windows_not_cut(tmp_path, packing):
    rows = [
        {"prompt": f"P{i}: " + "p" * 20 * i, "completion": f"C{i}" + "c" * 45 * i} for i in range(4)
    ]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([tmp_path / "x.jsonl"], tmp_path / "pc", kind="prompt_completion")
    c = cfg("gpt", tmp_path / "pc", packing=packing)
    ex = readers.build_examples(fmt.open_dataset(str(tmp_path / "pc")), "gpt", "train", c.data, 0)
    assert ex.split == 3 and ex.skipped == 0  # rows 1-3 are longer than seq_len=32
    tok = load_tokenizer("")
    scored = []
    for i in range(len(ex)):
        r = ex[i]
        seg = r["segment_ids"] if packing else (r["weights"] >= 0).astype(np.int32)
        for k in np.unique(seg[seg > 0]):
            m = seg == k
            text = tok.decode(np.append(r["inputs"][m][:1], r["targets"][m]))
            w = r["weights"][m] > 0
            if not text.startswith("P"):  # a continuation: >= half a row of context, unscored
                assert int(np.argmax(w)) >= 16 and int(m.sum()) == 32
            scored.extend(r["targets"][m][w].tolist())
    # Every completion token (and its EOS) is a target exactly once, in order; no prompt token.
    want = [t for row in rows for t in [*tok.encode(row["completion"]), tok.eos_id]]
    assert scored == want


def test_text2text_pairs_too_long_are_refused_or_counted(tmp_path):
    rows = [
        {"input": f"in {i}" + "z" * (40 if i < 3 else 0), "target": f"out {i}"} for i in range(40)
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([tmp_path / "t.jsonl"], tmp_path / "t2t", kind="text2text", eval_docs=4)
    ds = fmt.open_dataset(str(tmp_path / "t2t"))
    c = cfg("t5", tmp_path / "t2t", enc_len=24, dec_len=16)
    with pytest.raises(
        ValueError, match=r"of 36 train input/target pairs .* exceed data.enc_len=24"
    ):
        readers.build_examples(ds, "t5", "train", c.data, 0)
    c.data.max_dropped_fraction = 0.1
    ex = readers.build_examples(ds, "t5", "train", c.data, 0)
    assert ex.skipped in (1, 2, 3) and len(ex) == 36 - ex.skipped


def test_text2text_packed_rows(tmp_path):
    rows = [{"input": f"in {i}", "target": f"out {i}"} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([tmp_path / "t.jsonl"], tmp_path / "t2t", kind="text2text", eval_docs=4)
    c = cfg("t5", tmp_path / "t2t", packing=True, enc_len=24, dec_len=16)
    tok = load_tokenizer("")
    b = batches(c, n=1)[0]
    r = {k: v[0] for k, v in b.items()}
    segs = np.unique(r["encoder_segment_ids"][r["encoder_segment_ids"] > 0])
    assert len(segs) >= 2
    for k in segs:
        src = tok.decode(r["encoder_inputs"][r["encoder_segment_ids"] == k])
        tgt = tok.decode(r["targets"][r["decoder_segment_ids"] == k])
        assert tgt == "out " + src.split()[1]


def test_resume_mid_epoch_processes_and_new_epochs(text_dir):
    c = cfg("gpt", text_dir)
    ds = data_lib.make_dataset(c.data, "train", model="gpt")
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = iter(data_lib.make_dataset(c.data, "train", model="gpt"))
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(4)], strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    # Two processes hold the one-process batch between them (rows p, p + 2, ...).
    one = batches(c, n=2)
    two = [batches(c, n=2, process_index=p, process_count=2) for p in (0, 1)]
    for k in range(2):
        both = np.stack([two[0][k]["inputs"], two[1][k]["inputs"]], 1).reshape(4, -1)
        np.testing.assert_array_equal(both, one[k]["inputs"])
    # Each epoch is a permutation of the windows, in a new order.
    n = data_lib.num_examples(c.data, "train", "gpt")
    rows = [r for b in batches(c, n=2 * n // 4 + 1) for r in b["inputs"]]
    first, second = [tuple(r[:8]) for r in rows[:n]], [tuple(r[:8]) for r in rows[n : 2 * n]]
    assert sorted(first) == sorted(second) and first != second


def test_mixture_is_deterministic_and_weighted(text_dir, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ["ZZZZ " * 20] * 50)
    run([tmp_path / "b.jsonl"], tmp_path / "b", eval_docs=5)
    c = cfg("gpt", "", mixture=f"{text_dir}=3,{tmp_path / 'b'}=1")
    a, b = batches(c, n=10), batches(c, n=10)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    from_b = sum(int((r == ord("Z") + 2).mean() > 0.5) for x in a for r in x["inputs"])
    assert 6 <= from_b <= 14  # a quarter of 40 rows
    from bf16jax.data import mixture

    alone = mixture.source_configs(c.data)  # the trainer's evaluate reports each source's loss
    assert [(n, d.path, d.mixture) for n, d in alone] == [
        ("ds", str(text_dir), ""),
        ("b", str(tmp_path / "b"), ""),
    ]
    record = workdir.dataset_record(c)
    assert [r["weight"] for r in record] == [0.75, 0.25]
    ev = batches(c, split="eval", n=2)  # interleaved 3:1 by weight
    from_b = [int((r == ord("Z") + 2).mean() > 0.5) for x in ev for r in x["inputs"]]
    assert sum(from_b) == 2 and from_b[:4] == [0, 0, 0, 1]


def test_preflight_refuses_bad_prepared_data(text_dir, tmp_path, spm_dir):
    c = cfg("gpt", tmp_path / "nothing")
    with pytest.raises(ValueError, match="does not exist"):
        preflight.check_prepared(c)
    c = cfg("gpt", text_dir)
    c.model.vocab_size = 256
    with pytest.raises(ValueError, match="vocab_size=256 is smaller than the vocabulary"):
        preflight.check_prepared(c)
    c = cfg("gpt", text_dir, tokenizer=str(spm_dir))
    with pytest.raises(ValueError, match="differs from the model's"):
        preflight.check_prepared(c)
    c = cfg("gpt", text_dir)
    c.init_from = str(spm_dir)  # the pretrained model's own tokenizer files
    with pytest.raises(ValueError, match=f"differs from the model's \\({spm_dir}\\)"):
        preflight.check_prepared(c)
    write_jsonl(tmp_path / "a.jsonl", make_docs(20))
    run([tmp_path / "a.jsonl"], tmp_path / "noeval")
    with pytest.raises(ValueError, match="empty eval split"):
        preflight.check_prepared(cfg("gpt", tmp_path / "noeval"))
    preflight.check_prepared(cfg("gpt", text_dir))  # fine


def test_resume_refuses_a_changed_dataset(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", eval_docs=4)
    c = cfg("gpt", tmp_path / "ds")
    workdir.write_config(c, str(tmp_path / "run"))
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["dataset"][0]["meta_sha256"] == fmt.open_dataset(str(tmp_path / "ds")).meta_sha256
    workdir.check_config_change(c, str(tmp_path / "run"), resuming=True)  # unchanged: fine
    import shutil

    shutil.rmtree(tmp_path / "ds")
    write_jsonl(tmp_path / "a.jsonl", make_docs(41))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", eval_docs=4)
    with pytest.raises(ValueError, match="prepared dataset that changed"):
        workdir.check_config_change(c, str(tmp_path / "run"), resuming=True)


def test_prepare_options_names():
    assert prep.input_names(prep.Options(inputs=[], out="", kind="text2text")) == (
        "input",
        "target",
    )


@pytest.mark.parametrize("name", ["gpt2_124m_prepared", "t5_span_prepared", "flan_t5_small_ft"])
def test_prepared_configs_validate(name, text_dir):
    from bf16jax.config import config_path, load_config, validate

    extra = ["init_from=runs/flan_t5_small"] if name.startswith("flan") else []
    c = load_config(config_path(name), ["data.name=prepared", f"data.path={text_dir}", *extra])
    validate(c)
    assert c.data.name == "prepared"
    if c.model.name == "t5":
        _, targets, _, _ = readers.span_lengths(c.data)
        assert targets <= c.data.dec_len
    c.data.path = ""
    with pytest.raises(ValueError, match="pass --config.data.path=DIR"):
        validate(c)


def test_packing_plan_and_vector_span_counts():
    from bf16jax.data.span_corruption import span_counts

    lengths = np.arange(1, 2000)
    for density, mean in ((0.15, 3.0), (0.5, 3.0), (0.3, 2.5)):
        noise, spans = span_plan.span_counts_vec(lengths, density, mean)
        want = [span_counts(int(n), density, mean) for n in lengths]
        assert list(zip(noise.tolist(), spans.tolist(), strict=True)) == want
    bounds = readers.pack_plan([np.array([3, 3, 5, 1, 9, 2])], [8])
    assert bounds.tolist() == [0, 2, 4, 5, 6]  # [3,3] [5,1] [9] [2]: greedy, in order


def test_t5_packed_chunks_are_document_pieces(text_dir):
    from bf16jax.data.span_corruption import merge_spans

    c = cfg("t5", text_dir, packing=True, enc_len=64, dec_len=24)
    ds = fmt.open_dataset(str(text_dir))
    ex = readers.build_examples(ds, "t5", "train", c.data, 0)
    tok = load_tokenizer("")
    docs = set(make_docs(200))
    chunk, _, _, _ = readers.span_lengths(c.data)
    for i in range(0, len(ex), 7):
        r = ex.fn(i, ex[i])
        seg_e, seg_d = r["encoder_segment_ids"], r["decoder_segment_ids"]
        for k in np.unique(seg_e[seg_e > 0]):
            piece = tok.decode(
                merge_spans(r["encoder_inputs"][seg_e == k], r["targets"][seg_d == k])
            )
            # A chunk of one document, cut at multiples of `chunk` bytes from its start.
            assert any(
                d.encode()[j : j + chunk].decode("utf-8", "replace") == piece or piece in d
                for d in docs
                for j in range(0, len(d.encode()), chunk)
            )
