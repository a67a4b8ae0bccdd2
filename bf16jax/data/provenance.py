"""Which data a run trained on and which data a tool measures on, as a small JSON record.

A record is `{"name": "prepared", "sources": [{path, meta_sha256, kind, tokenizer, weight}]}`
for prepared data (`bf16jax.data.prepared.PreparedDataset.record`: the metadata hash changes
whenever the corpus is prepared again, even at the same path) or `{"name": NAME, "tokenizer":
SPEC}` for a bundled dataset. `compare` says whether two records name the same data, so that
evaluate / gate / export refuse to measure a model on another corpus than its own unless asked.
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe", "describe_saved", "compare", "same_tokenizer", "summary"]


def describe(data_cfg) -> dict[str, Any]:
    """The record of the data `data_cfg` reads (prepared datasets are opened and verified)."""
    name = str(data_cfg.get("name", ""))
    if name == "prepared":
        from bf16jax.data import mixture

        return {"name": name, "sources": mixture.prepared_record(data_cfg)}
    return {"name": name, "tokenizer": str(data_cfg.get("tokenizer", "") or "bytes")}


def describe_saved(tree: dict | None) -> dict[str, Any] | None:
    """The record of the data a run trained on, from its saved config (WORKDIR/config.json or
    an artifact manifest's "config": prepared data is under "dataset"); None if unknown."""
    if not tree or "data" not in tree:
        return None
    data = tree["data"]
    if data.get("name") == "prepared":
        sources = tree.get("dataset")
        return {"name": "prepared", "sources": list(sources)} if sources else None
    return {"name": str(data.get("name", "")), "tokenizer": str(data.get("tokenizer") or "bytes")}


def _key(record: dict) -> Any:
    if record["name"] != "prepared":
        return (record["name"], record["tokenizer"])
    return tuple((s["path"], s["meta_sha256"], float(s["weight"])) for s in record["sources"])


def _tokenizer(record: dict) -> Any:
    if record["name"] != "prepared":
        return None  # a bundled set's ids follow data.tokenizer (checked by the preflight)
    t = record["sources"][0]["tokenizer"]
    return (t["kind"], tuple(sorted(t["files"].items())))


def compare(trained: dict | None, measured: dict) -> str | None:
    """None when `measured` is the data `trained` names (or `trained` is unknown), else one
    phrase saying how they differ."""
    if trained is None or _key(trained) == _key(measured):
        return None
    if trained["name"] != "prepared" or measured["name"] != "prepared":
        return f"the model trained on {summary(trained)}, this reads {summary(measured)}"
    old = {s["path"]: s["meta_sha256"] for s in trained["sources"]}
    for s in measured["sources"]:
        if s["path"] in old and old[s["path"]] != s["meta_sha256"]:
            return (
                f"prepared dataset {s['path']} changed since the model trained on it (metadata "
                f"sha256 {old[s['path']][:12]} -> {s['meta_sha256'][:12]})"
            )
    return f"the model trained on {summary(trained)}, this reads {summary(measured)}"


def same_tokenizer(trained: dict | None, measured: dict) -> bool:
    """Whether both records' prepared data share one tokenizer (True when either is bundled
    data or unknown: the preflight checks those against the model)."""
    if trained is None:
        return True
    a, b = _tokenizer(trained), _tokenizer(measured)
    return a is None or b is None or a == b


def summary(record: dict | None) -> str:
    """One line naming the data: `prepared DIR (meta 1a2b3c4d5e6f, tokenizer bpe)` or
    `kjv_bytes (tokenizer bytes)`."""
    if record is None:
        return "unknown data (no record)"
    if record["name"] != "prepared":
        return f"{record['name']} (tokenizer {record['tokenizer']})"
    parts = [
        f"{s['path']} (meta {s['meta_sha256'][:12]}, tokenizer {s['tokenizer']['kind']}"
        + (f", weight {s['weight']:.3g})" if len(record["sources"]) > 1 else ")")
        for s in record["sources"]
    ]
    return "prepared " + " + ".join(parts)
