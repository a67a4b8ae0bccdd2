"""Where a compiled program's "bytes accessed" go: XLA's cost analysis per top-level instruction.

    python experiments/hlo_bytes.py /tmp/pc/x/hlo/peer_L1.hlo.txt.gz            # one program
    python experiments/hlo_bytes.py A_L1.hlo.txt.gz A_L2.hlo.txt.gz --top=30    # per layer

Reads an optimized HLO module as `program_compare.py --dump_hlo` writes it (e.g. for a TPU
chip), cuts out each top-level instruction (the entry's and the non-fused computations' ops:
fusions, copies, async copy starts, custom calls, ...) with the computations it calls into a
module of its own, and asks XLA's `HloCostAnalysis` (through this machine's CPU client) for its
bytes accessed. The CPU analysis of a TPU module gives the TPU's figure (a gpt2_124m block's
forward and backward: 10.640 GB here vs 10.647 GB from libtpu), so the per-instruction figures
add up to close to `compiled.cost_analysis()`'s total (the async `*-done` halves are left out).
Rows are grouped by op and the op_name metadata (jit/jvp/transpose scopes); with two files
(the same program at 1 and 2 layers) the rows are the differences: one layer's bytes.
Uses jaxlib internals (`jaxlib._hlo.hlo_module_from_text`, `_jax.hlo_module_cost_analysis`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from program_compare import _INSTR, _OPCODE, fusion_bodies, hlo_computations  # noqa: E402

_REFS = re.compile(
    r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}"
)
_SKIP = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while"}
_SKIP |= {"conditional", "call", "after-all", "slice-done", "copy-done"}


def _refs(line: str) -> list[str]:
    out = []
    for one, many in _REFS.findall(line):
        out += [one] if one else [x.strip().lstrip("%") for x in many.split(",")]
    return out


def _operands(rhs: str, start: int) -> tuple[str, str]:
    """(the text inside the op's parentheses, the attributes after them)."""
    depth = 0
    for i in range(start, len(rhs)):
        depth += {"(": 1, ")": -1}.get(rhs[i], 0)
        if depth == 0:
            return rhs[start + 1 : i], rhs[i + 1 :]
    raise ValueError(f"unbalanced operands in {rhs[:80]!r}")


def instruction_bytes(text: str) -> list[tuple[str, str, str, float]]:
    """(op, op_name metadata, output shape, bytes accessed) of each top-level instruction."""
    import jax
    import jaxlib._hlo as hlo
    from jax._src.lib import _jax

    client = jax.devices("cpu")[0].client
    bodies = hlo_computations(text)
    order = list(bodies)
    shapes = {}
    for lines in bodies.values():
        for line in lines[1:]:
            if m := _INSTR.match(line):
                op = _OPCODE.search(" " + m.group(2))
                shapes[m.group(1)] = m.group(2)[: op.start()].strip() if op else m.group(2)
    fused = fusion_bodies(bodies)
    rows = []
    for name in (n for n in bodies if n not in fused):
        for line in bodies[name][1:]:
            m = _INSTR.match(line)
            rhs = " " + m.group(2) if m else ""
            op = _OPCODE.search(rhs)
            if not op or op.group(1) in _SKIP:
                continue
            inner, tail = _operands(rhs, op.end() - 1)
            operands = re.findall(r"%([\w.\-]+)", inner)
            for i, x in enumerate(operands):
                inner = re.sub("%" + re.escape(x) + r"(?![\w.\-])", f"%p{i}", inner)
            tail = re.sub(r",\s*backend_config=(\{.*\}|\"[^\"]*\")\s*$", "", tail)
            tail = re.sub(r",\s*metadata=\{[^}]*\}", "", tail)
            called, todo = set(), _refs(line)
            while todo:
                c = todo.pop()
                if c in bodies and c not in called:
                    called.add(c)
                    todo += [r for ln in bodies[c] for r in _refs(ln)]
            params = [f"  %p{i} = {shapes[x]} parameter({i})" for i, x in enumerate(operands)]
            root = f"  ROOT %out = {shapes[m.group(1)]} {op.group(1)}({inner}){tail}"
            module = "HloModule one\n\n" + "\n\n".join(
                "\n".join(bodies[c]) for c in sorted(called, key=order.index)
            )
            module += "\n\nENTRY %e {\n" + "\n".join([*params, root]) + "\n}\n"
            try:
                parsed = hlo.hlo_module_from_text(module)
            except Exception:  # e.g. a Pallas call's kernel metadata: keep its target only
                target = re.search(r'custom_call_target="[^"]*"', tail)
                root = root.split(f" {op.group(1)}(")[0] + f" {op.group(1)}({inner})"
                root += f", {target.group(0)}" if target else ""
                module = module.rsplit("\n  ROOT ", 1)[0] + "\n" + root + "\n}\n"
                parsed = hlo.hlo_module_from_text(module)
            cost = _jax.hlo_module_cost_analysis(client, parsed)
            meta = re.search(r'op_name="([^"]*)"', line)
            rows.append((op.group(1), meta.group(1) if meta else "-", shapes[m.group(1)],
                         float(cost.get("bytes accessed", 0.0))))  # fmt: skip
    return rows


def grouped(path: str) -> Counter:
    """Bytes accessed per "op | op_name" group of one dumped program."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = instruction_bytes(f.read())
    out: Counter = Counter()
    for op, meta, _, b in rows:
        meta = re.sub(r"jit\((train_)?step\)/", "", re.sub(r"\[\d+\]|\.\d+", "", meta))
        out[f"{op} | {meta[-80:]}"] += b
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hlo", nargs="+", help="one program, or the same at 1 and 2 layers")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if len(args.hlo) > 2:
        parser.error("give one HLO file, or two (1 and 2 layers)")
    a = grouped(args.hlo[0])
    if len(args.hlo) == 2:
        b = grouped(args.hlo[1])
        a = Counter({k: b[k] - a[k] for k in set(a) | set(b)})
        print(f"per layer: {sum(a.values()) / 1e9:.3f} GB")
    else:
        print(f"total: {sum(a.values()) / 1e9:.3f} GB")
    for key in sorted(a, key=lambda k: -abs(a[k]))[: args.top]:
        print(f"{a[key] / 1e6:10.1f} MB  {key}")


if __name__ == "__main__":
    main()
