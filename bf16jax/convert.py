"""Command: `python -m bf16jax.convert import|export` (Hugging Face <-> bf16jax directories).

    python -m bf16jax.convert import HF_DIR OUT_DIR [--precision=bf16]
    python -m bf16jax.convert export OUT_DIR HF_OUT [--checkpoint=WORKDIR] [--step=N]

The conversion itself is `bf16jax.interop.convert`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bf16jax.interop.convert import export_hf, import_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bf16jax.convert",
        description="Pretrained checkpoints in and out: Hugging Face directories <-> bf16jax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> bf16jax directory")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--precision", default="bf16", help="policy whose param dtype is stored")
    exp = sub.add_parser("export", help="bf16jax directory (+ a fine-tuned run) -> HF directory")
    exp.add_argument("src_dir", help="a directory written by `import`")
    exp.add_argument("out_dir")
    exp.add_argument("--checkpoint", default=None, help="a training workdir to take params from")
    exp.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "import":
            manifest = import_hf(args.hf_dir, args.out_dir, precision=args.precision)
            print(json.dumps({"model": manifest["model"], "precision": manifest["precision"]}))
        else:
            export_hf(args.src_dir, args.out_dir, checkpoint=args.checkpoint, step=args.step)
            written = sorted(os.listdir(args.out_dir))
            size = sum(os.path.getsize(os.path.join(args.out_dir, n)) for n in written)
            said = {"exported": os.path.abspath(args.out_dir), "files": written, "bytes": size,
                    "params_from": args.checkpoint or args.src_dir}  # fmt: skip
            print(json.dumps(said))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
