"""Host time of the multi-host stop agreement (`bf16jax.training.preemption.StopAgreement`),
measured.

Starts `--processes` CPU processes under jax.distributed (no model: the check is host work only,
a barrier and one key read on JAX's coordination service), runs `--ticks` checks without a
signal, then signals process `--processes - 1` at a random tick while the processes run at
different speeds (process p sleeps p * `--skew_ms` per tick) and checks that all stop at one tick.
Prints one JSON line per process:

    python experiments/stop_agreement_cost.py --processes=2 --ticks=500

The per-check figure is what `train.preemption_check_every=1` adds to each training step's host
time; the device is not touched (no sync), so it is hidden while the host runs ahead.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time


def _child(args) -> None:
    import jax

    jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id)
    from jax._src import distributed

    from bf16jax.training.preemption import StopAgreement

    client, pid = distributed.global_state.client, args.process_id
    quiet = StopAgreement(client, pid, every=1)
    t0 = time.perf_counter()
    for tick in range(1, args.ticks + 1):
        assert quiet.decide(tick, None) is None
    per_check_ms = (time.perf_counter() - t0) / args.ticks * 1e3
    raced = StopAgreement(client, pid, every=1)
    signal_at = random.Random(args.port).randrange(5, 50)
    stop_at, tick = None, 0
    while stop_at is None:
        tick += 1
        time.sleep(pid * args.skew_ms / 1e3)
        flag = "SIGTERM" if pid == args.processes - 1 and tick >= signal_at else None
        if raced.decide(tick, flag) is not None:
            stop_at = tick
    row = {"process": pid, "per_check_ms": round(per_check_ms, 3), "checks": args.ticks}
    row.update({"signalled_at_tick": signal_at, "stopped_at_tick": stop_at})
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--ticks", type=int, default=500)
    p.add_argument("--skew_ms", type=float, default=2.0)
    p.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.process_id is not None:
        return _child(args)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, __file__, f"--processes={args.processes}", f"--ticks={args.ticks}"]
    base += [f"--skew_ms={args.skew_ms}", f"--port={port}"]
    procs = [
        subprocess.Popen([*base, f"--process_id={i}"], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(args.processes)
    ]
    rows = [json.loads(proc.communicate(timeout=600)[0].strip().splitlines()[-1]) for proc in procs]
    for row in rows:
        print(json.dumps(row))
    stops = {row["stopped_at_tick"] for row in rows}
    print(json.dumps({"agreed": len(stops) == 1, "load": os.getloadavg()[0]}))
    sys.exit(0 if len(stops) == 1 else 1)


if __name__ == "__main__":
    main()
