"""XLA:CPU host settings, side by side: the default job's train steps with each setting on and off.

    python bench/cpu_host.py                 # 3 interleaved rounds of every variant
    python bench/cpu_host.py --rounds=5 --steps=30

Each variant runs in its own process (XLA flags and allocator settings are per process), in
interleaved rounds (A B C A B C ...) so that a shared machine's load falls on all of them alike.
Variants: `baseline` (glibc's default malloc), `hugepages` (what `maskgen.cpu_host` turns on for
train.py, sample.py and the benches on CPU-only hosts), `hugepages+xla_convs` (convolutions also
kept off YNNPACK). A worker times the default job's tokenizer step (VQGAN + discriminator, batch
64) and transformer step (batch 64) with `bench/train_step.py`'s timers and counts the page
faults the timed steps took.
Rows (one per variant and round, with the CPU model and ISA) go to bench/results/cpu_host.json;
the summary prints the median step time of each variant and its ratio to the baseline.
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "cpu_host.json")

_XLA_CONVS = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"}
# name -> environment added to the worker's (GLIBC_TUNABLES: what maskgen.cpu_host turns on)
VARIANTS = {
    "baseline": {},
    "hugepages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "hugepages+xla_convs": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **_XLA_CONVS},
}


def worker(steps: int, config: str, batch: int) -> dict:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import train_step  # bench/train_step.py

    from maskgen import sharding as shd

    mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    out = {}
    for stage in ("tokenizer", "transformer"):
        cfg = train_step.load_config(config, batch, "")
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if stage == "tokenizer":
            r = train_step.bench_tokenizer(cfg, mesh, steps, batch)
        else:
            r = train_step.bench_transformer(cfg, mesh, steps)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        out[stage] = dict(step_time_s=r["step_time_s"], page_faults_per_step=faults / (steps + 1))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage after compilation")
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(args.steps, args.config, args.batch)), flush=True)
        return

    sys.path.insert(0, REPO)
    from maskgen import hardware
    names = args.variants.split(",")
    rows = []
    for round_ in range(args.rounds):
        for name in names:
            extra = VARIANTS[name]
            env = dict(os.environ, MASKGEN_CPU_HUGEPAGES="0")  # the variant alone decides
            for var, value in extra.items():
                env[var] = " ".join(f for f in (env.get(var, ""), value) if f)
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--steps={args.steps}",
                   f"--config={args.config}", f"--batch={args.batch}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            result = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")))
            row = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       variant=name, round=round_, config=args.config, batch=args.batch, steps=args.steps,
                       xla_flags=env.get("XLA_FLAGS", ""), glibc_tunables=env.get("GLIBC_TUNABLES", ""),
                       load_average=os.getloadavg()[0], note=args.note,
                       **hardware.cpu_info(), **result)
            rows.append(row)
            print(f"round {round_} {name:30s} tokenizer {result['tokenizer']['step_time_s'] * 1e3:7.1f} ms "
                  f"({result['tokenizer']['page_faults_per_step']:7.0f} faults/step)  transformer "
                  f"{result['transformer']['step_time_s'] * 1e3:7.1f} ms "
                  f"({result['transformer']['page_faults_per_step']:7.0f} faults/step)", flush=True)
    base = {s: statistics.median(r[s]["step_time_s"] for r in rows if r["variant"] == names[0])
            for s in ("tokenizer", "transformer")}
    for name in names:
        med = {s: statistics.median(r[s]["step_time_s"] for r in rows if r["variant"] == name) for s in base}
        print(f"median {name:30s} " + "  ".join(
            f"{s} {med[s] * 1e3:7.1f} ms (x{base[s] / med[s]:.2f} vs {names[0]})" for s in base))
    existing = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            existing = json.load(f)
    with open(args.out + ".tmp", "w") as f:
        json.dump(existing + rows, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
