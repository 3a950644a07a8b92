"""Random-bit throughput of each jax PRNG implementation (config.prng_impl) on this host.

    python bench/prng_cpu.py            # appends rows to bench/results/prng_cpu.json

Per implementation: 32-bit words/s of `jax.random.bits`, and dropout-mask
elements/s of the 8-bit-lane `keep_mask` (4 elements per word) next to
`jax.random.bernoulli` (one uniform per element), on a [32, 8, 257, 257]
mask (the medium preset's attention probabilities). Each row records the CPU
model and the widest vector ISA from lscpu, since the numbers are ISA-bound.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maskgen import prng
from maskgen.models.dropout import keep_mask

RESULTS = os.path.join(REPO, "bench", "results", "prng_cpu.json")
ISAS = ("avx512f", "avx2", "avx", "sse4_2")  # widest first


def cpu_info() -> dict:
    """CPU model, core count and the widest vector ISA lscpu lists."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"cpu_model": fields.get("Model name", "?").strip(),
            "cpus": os.cpu_count(),
            "widest_isa": next((i for i in ISAS if i in flags), "none")}


def _time(fn, key, repeats: int) -> float:
    """Best wall time of `repeats` calls after compilation (seconds)."""
    jax.block_until_ready(fn(key))
    best = float("inf")
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        t = time.perf_counter()
        jax.block_until_ready(fn(k))
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,8,257,257", help="mask shape")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default=",".join(prng.PRNG_IMPLS))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    n = 1
    for s in shape:
        n *= s
    info = cpu_info()
    rows = []
    for impl in args.impls.split(","):
        key = prng.make_key(0, impl)
        words = jax.jit(lambda k: jax.random.bits(k, shape, jnp.uint32))
        lanes = jax.jit(lambda k: keep_mask(k, shape, 0.1))
        bern = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, shape))
        t_words, t_lanes, t_bern = (_time(f, key, args.repeats) for f in (words, lanes, bern))
        row = dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            impl=impl, shape=list(shape), backend=jax.default_backend(), jax=jax.__version__, **info,
            loadavg_1m=os.getloadavg()[0],  # other processes on the host slow every column alike
            words_per_s=n / t_words, mask_8bit_lanes_elems_per_s=n / t_lanes,
            mask_bernoulli_elems_per_s=n / t_bern, lanes_speedup=t_bern / t_lanes)
        rows.append(row)
        print(f"{impl:13s} words {n / t_words / 1e6:8.1f} M/s   8-bit-lane mask {n / t_lanes / 1e6:8.1f} M/s"
              f"   bernoulli {n / t_bern / 1e6:8.1f} M/s   ({row['lanes_speedup']:.2f}x)", flush=True)
    old = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    with open(args.out, "w") as f:
        json.dump(old + rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
