"""The T5 packing plan on disk (bf16jax.data.span_plan): the greedy rule, the rows of a
multi-shard stream, and the cache (read back, rebuilt when damaged, apart per setting)."""

import os

import numpy as np
from prepared_corpus import make_docs, run, write_jsonl

from bf16jax.data import prepared as fmt
from bf16jax.data import readers, span_plan


def greedy_reference(needs, limits):
    """pack_plan's rule, one item at a time."""
    bounds, used = [0], [0] * len(limits)
    for i in range(len(needs[0])):
        need = [int(x[i]) for x in needs]
        if i > bounds[-1] and any(u + n > m for u, n, m in zip(used, need, limits, strict=True)):
            bounds.append(i)
            used = [0] * len(limits)
        used = [u + n for u, n in zip(used, need, strict=True)]
    if len(needs[0]) > bounds[-1]:
        bounds.append(len(needs[0]))
    return bounds


def test_greedy_rows_match_the_one_at_a_time_rule():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 300):
        a, b = rng.integers(1, 40, n), rng.integers(1, 15, n)
        for limits in ([50, 20], [39, 14], [10, 100]):
            assert readers.pack_plan([a, b], limits).tolist() == greedy_reference([a, b], limits)
    # In pieces, the open row carried into the next piece: the same rows.
    a, b = rng.integers(1, 40, 1000), rng.integers(1, 15, 1000)
    starts, carry = [], np.zeros(0, np.int64)
    for lo in range(0, 1000, 97):
        piece = np.arange(lo, min(lo + 97, 1000))
        idx = np.concatenate([carry, piece])
        rows, stop = span_plan.greedy_rows([a[idx], b[idx]], [50, 20], piece[-1] == 999)
        starts += [int(idx[0]) + r for r in rows]
        carry = idx[stop:]
    assert starts + [1000] == greedy_reference([a, b], [50, 20])


def test_plan_rows_cover_every_chunk_in_order_and_are_cached(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(300))
    run([tmp_path / "a.jsonl"], tmp_path / "ds", shard_tokens=1500)
    ds = fmt.open_dataset(str(tmp_path / "ds"))
    assert len(ds.shards("train")) > 5
    stream = readers.TokenStream(ds.shards("train"), "text")
    args = (ds, "train", stream, 10, 64, 24, 0.15, 3.0)  # several chunks a row
    plan = span_plan.open_plan(*args)
    rows = [plan.row(r) for r in range(len(plan))]
    starts = [s for r in rows for s in r[0]]
    lens = [n for r in rows for n in r[1]]
    # Every document without its EOS, cut every 10 tokens, in stream order, each chunk once.
    want = []
    for d in range(stream.num_docs):
        doc = stream.doc(d)
        body = len(doc) - 1
        want += [len(doc[k : min(k + 10, body)]) for k in range(0, body, 10)]
    assert lens == want and starts == sorted(starts)
    shard_of = [set(np.searchsorted(stream.bases, s, "right").tolist()) for s, _ in rows]
    assert any(len(k) > 1 for k in shard_of)  # rows go on into the next shard
    (index,) = [f for f in os.listdir(tmp_path / "ds" / "plans") if f.endswith(".json")]
    prefix = tmp_path / "ds" / "plans" / index[: -len(".json")]
    mtime = os.stat(f"{prefix}.rows").st_mtime_ns
    assert [span_plan.open_plan(*args).row(r) for r in range(len(plan))] == rows  # read back
    assert os.stat(f"{prefix}.rows").st_mtime_ns == mtime
    data = bytearray((prefix.parent / f"{prefix.name}.lens").read_bytes())
    data[0] ^= 1
    (prefix.parent / f"{prefix.name}.lens").write_bytes(bytes(data))  # damaged: rebuilt
    assert [span_plan.open_plan(*args).row(r) for r in range(len(plan))] == rows
    other = span_plan.open_plan(ds, "train", stream, 10, 32, 12, 0.15, 3.0)
    assert len(other) > len(plan) and len(os.listdir(tmp_path / "ds" / "plans")) == 8


def test_plan_goes_elsewhere_where_the_dataset_is_not_writable(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    run([tmp_path / "a.jsonl"], tmp_path / "ds")
    ds = fmt.open_dataset(str(tmp_path / "ds"))
    stream = readers.TokenStream(ds.shards("train"), "text")
    monkeypatch.setattr(span_plan, "_plan_dirs", lambda ds: ["/proc/no-such-place"])
    monkeypatch.setattr(span_plan.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "tmp"))
    plan = span_plan.open_plan(ds, "train", stream, 10, 64, 24, 0.15, 3.0)
    assert len(plan) > 0 and any(f.endswith(".json") for f in os.listdir(tmp_path / "tmp"))
