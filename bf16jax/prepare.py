"""Command: `python -m bf16jax.prepare` (raw text -> a prepared dataset directory, once).

    python -m bf16jax.prepare INPUT... --out=DIR [--tokenizer=MODEL_DIR] [--kind=text]
        [--eval_fraction=0.01 | --eval_docs=N] [--workers=2] [--num_parts=N --part_index=I]
    python -m bf16jax.prepare --verify=DIR

INPUTs are files, directories or globs of .txt, .jsonl(.gz/.zst) and .parquet. The library is
`bf16jax.data.prepare` (format: `bf16jax.data.prepared`). Exit 2 with one line for bad input,
too many bad records, or (--verify) a damaged dataset.
"""

from __future__ import annotations

import argparse
import json
import sys

from bf16jax.cli import BAD_INPUT_EXIT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bf16jax.prepare",
        description="Tokenize raw text once into shards of flat token arrays for training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("inputs", nargs="*", help="files, directories or globs")
    p.add_argument("--out", help="the dataset directory (created)")
    p.add_argument("--verify", metavar="DIR", help="only check DIR's manifests and shard hashes")
    p.add_argument(
        "--tokenizer",
        default="",
        help="'' = bytes; a directory with tokenizer.json "
        "(BPE) or spiece.model (SentencePiece), e.g. a `bf16jax.convert import` output",
    )
    p.add_argument("--kind", default="text", choices=("text", "text2text", "prompt_completion"))
    p.add_argument("--text_field", default="text")
    p.add_argument("--input_field", default="input", help="--kind=text2text")
    p.add_argument("--target_field", default="target", help="--kind=text2text")
    p.add_argument("--prompt_field", default="prompt", help="--kind=prompt_completion")
    p.add_argument("--completion_field", default="completion", help="--kind=prompt_completion")
    p.add_argument(
        "--txt_unit",
        default="paragraph",
        choices=("line", "paragraph", "file"),
        help="one .txt document per line, per blank-line paragraph, or per file",
    )
    p.add_argument("--eval_fraction", type=float, default=0.0, help="held-out documents, by hash")
    p.add_argument("--eval_docs", type=int, default=0, help="held-out document count (per part)")
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--num_parts", type=int, default=1, help="machines preparing into one --out")
    p.add_argument(
        "--part_index",
        type=int,
        default=0,
        help="this machine's part (input files part_index, part_index + num_parts, ...)",
    )
    p.add_argument("--shard_tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.add_argument("--max_bad_fraction", type=float, default=0.01)
    p.add_argument(
        "--bpe_encoder",
        default="auto",
        choices=("auto", "tiktoken", "tokenizers"),
        help="a tokenizer.json BPE: tiktoken where it gives the same ids (checked), or tokenizers",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bf16jax.data import prepare as prep
    from bf16jax.data import prepared

    try:
        if args.verify:
            ds = prepared.open_dataset(args.verify, full=True)
            print(
                json.dumps(
                    {
                        "path": ds.path,
                        "kind": ds.kind,
                        "meta_sha256": ds.meta_sha256,
                        "tokenizer": ds.tokenizer["kind"],
                        "documents": {s: ds.documents(s) for s in ("train", "eval")},
                        "tokens": {s: ds.tokens(s) for s in ("train", "eval")},
                    }
                )
            )
            return 0
        if not args.inputs or not args.out:
            raise ValueError("pass INPUT files / directories / globs and --out=DIR (or --verify).")
        fields = {f.name for f in prep.Options.__dataclass_fields__.values()}
        opts = prep.Options(
            **{k: v for k, v in vars(args).items() if k in fields},
            progress=not args.no_progress,
        )
        manifest = prep.prepare(opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT
    splits = manifest["splits"]
    print(
        json.dumps(
            {
                "out": args.out,
                "part": manifest["part"],
                "dtype": manifest["dtype"],
                "documents": {s: v["documents"] for s, v in splits.items()},
                "tokens": {s: v["tokens"] for s, v in splits.items()},
                "rejected": manifest["rejects"]["total"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
