"""Peer: the same GPT in PyTorch with torch.compile, autocast BF16 and fused AdamW: the setup a
PyTorch user would pick (adapted from `../shared/bench/torch_gpt_anchor.py`, measured on an
H100: 478,587 tokens/s for GPT-2 124M at 16 x 1024).

FP32 params, `torch.autocast(bfloat16)`, `F.scaled_dot_product_attention(is_causal=True)` (flash
attention on a GPU), fused q/k/v, tied embeddings, no biases, FP32 logits into the loss,
`torch.optim.AdamW(fused=True)`. Runs on CUDA when available, else on the CPU (autocast on CPU;
for the tiny smoke run only). Needs the optional `bench` extra (torch).

    python experiments/peers/torch_gpt.py --shape='{"V": 50304, "D": 768, "L": 12, "H": 12,
        "T": 1024, "B": 16}' --steps=20

Prints one JSON line like experiments/peers/jax_gpt.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.w1, self.w2 = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.H, D // self.H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.w2(F.gelu(self.w1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, V, D, L, H, T):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList([Block(D, H) for _ in range(L)])
        self.lnf = nn.LayerNorm(D)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx, tgt):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lnf(x) @ self.wte.weight.T
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.reshape(-1))


def run(shape: dict, *, steps: int = 20, warmup: int = 3, compile: bool = True):
    """Trains `steps` timed steps of the GPT of `shape` (V, D, L, H, T, B); returns figures."""
    V, D, L, H, T, B = (int(shape[k]) for k in ("V", "D", "L", "H", "T", "B"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    m = GPT(V, D, L, H, T).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    cm = torch.compile(m) if compile else m
    tok = torch.randint(0, V, (B, T + 1), device=dev)

    def step():
        with torch.autocast(dev, torch.bfloat16):
            loss = cm(tok[:, :-1], tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    n = sum(p.numel() for p in m.parameters()) - T * D
    if dev == "cuda":
        mem, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        device = torch.cuda.get_device_name()
    else:
        mem, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"
        device = "cpu"
    return {
        "impl": "PyTorch",
        "setup": f"torch.compile{'' if compile else ' (off)'} + autocast bf16, SDPA attention, "
        "FP32 logits, fused AdamW",
        "device": device,
        "versions": {"torch": torch.__version__},
        "n_params": int(n),
        "shape": {"V": V, "D": D, "L": L, "H": H, "T": T, "B": B},
        "step_ms": dt * 1e3,
        "tokens_per_s": B * T / dt,
        "compile_s": compile_s,
        "peak_memory_bytes": int(mem),
        "peak_memory_kind": kind,
        "final_loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, help='JSON: {"V", "D", "L", "H", "T", "B"}')
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true", help="eager PyTorch (debugging)")
    args = parser.parse_args()
    out = run(
        json.loads(args.shape), steps=args.steps, warmup=args.warmup, compile=not args.no_compile
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
