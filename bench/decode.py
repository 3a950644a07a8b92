"""Decode throughput: plain MaskGIT decoding, ReCAP, and the matched-cost baseline, side by side.

    python bench/decode.py --config=medium --batch=8 --steps=8 --out FILE.json
    python bench/decode.py --config=medium --batch=8 --steps=32 \\
        --recap_cheap_per_full=1,2,3 --recap_full_only_steps=0 --out FILE.json
    python bench/decode.py --checkpoint=WORKDIR --steps=8 --quality --out FILE.json

Modes (all in one process, compiled before any timing, interleaved repeat by repeat):
  plain    T steps, one full evaluation each;
  recap    the same T with K cheap evaluations per full one (K from
           --recap_cheap_per_full, P leading full-only steps);
  matched  plain decoding with as many steps as that ReCAP run has full
           evaluations (the matched-cost baseline).
Tokens only (no pixel decoding), no guidance unless --guidance_scale, random
weights at the named config's size or a trained model (--checkpoint).

Accounting: `model_s` = time of the model evaluations alone, i.e. the jitted full
forward (and each cheap forward shape) timed separately at the decode's shapes
and multiplied by how often the decode calls it; `loop_overhead` = 1 - model_s /
decode_s (full evaluations are charged at the plain forward's time, see
`measure`; the standalone forward_with_kv time is recorded as full_kv_eval_s);
`flops_per_image` = analytic FLOPs of every evaluation of one image's
decode (`maskgen.flops`, cheap evaluations at the row count the compiled loop
computes); `mfu` = images_per_s * flops_per_image / matmul_flops_per_s, the
last measured in the same run (an n x n fp32 matmul). Times are best-of
--repeats (medians recorded too), cases alternate their order repeat by repeat.
Every figure also comes on a process-CPU-time basis (`*_cpu*` keys: CPU
seconds of all threads): on a loaded machine wall times swing 2x while CPU
times hardly move, so the CPU-time ratios are the ones to compare there.

--quality (needs --checkpoint of a Fashion-MNIST run): every mode also decodes
pixels for --quality_samples images and scores them with
`maskgen.eval.fashion.fashion_quality`; a quality-vs-time plot is written.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _path in (REPO, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from maskgen import config_io, flops, hardware, scheduler  # noqa: E402
from maskgen.models.sizes import seq_len, token_grid, token_layout  # noqa: E402
from maskgen.sampling import decode_config_from  # noqa: E402

METHODS = ("plain", "recap", "matched")
RESULTS_DIR = os.path.join(REPO, "bench", "results")


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode to time: plain (cheap_per_full = 0) or ReCAP with (K, P)."""
    steps: int
    cheap_per_full: int = 0
    full_only_steps: int = 0

    @property
    def recap(self) -> bool:
        return self.cheap_per_full > 0


@dataclasses.dataclass
class Model:
    """What the bench needs of a model: its module, parameters, config and sizes."""
    name: str
    module: object
    params: object
    cfg: object
    bundle: object = None  # maskgen.bundle.Bundle when loaded from a checkpoint

    @property
    def layout(self):
        return token_layout(self.cfg)

    @property
    def length(self) -> int:
        return seq_len(self.cfg)


def parse_int_list(text, name: str, minimum: int) -> Tuple[int, ...]:
    """'8,12' -> (8, 12); ValueError naming the flag on anything else."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise ValueError(f"--{name} needs integers >= {minimum}, got {text!r}")
    return values


def parse_methods(text) -> Tuple[str, ...]:
    methods = tuple(m.strip() for m in str(text).split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods takes a comma-separated subset of {METHODS}, got {text!r}")
    return methods


def load_config(name: str):
    """A config by name in configs/ (or a path to a config file)."""
    path = name if name.endswith(".py") else os.path.join(REPO, "configs", f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"unknown config {name!r}: no file {path}")
    return config_io.load_config_file(path)


def apply_overrides(cfg, overrides):
    """`a.b=value` strings onto a config (`config_io.apply_overrides`, errors naming --set)."""
    return config_io.apply_overrides(cfg, overrides, flag="--set ")


def random_model(config_name: str, seed: int = 0, overrides=()) -> Model:
    """Random weights at a config's size (the cost of decoding does not depend on the values)."""
    from flax.core import meta

    from maskgen.models import factory
    cfg = apply_overrides(load_config(config_name), overrides)
    module = factory.transformer_model(cfg)
    example = jnp.zeros((1, seq_len(cfg)), jnp.int32)
    params = meta.unbox(jax.jit(module.init)(jax.random.key(seed), example)["params"])
    name = os.path.splitext(os.path.basename(config_name))[0]
    if overrides:
        name += "[" + ",".join(overrides) + "]"
    return Model(name, module, params, cfg)


def checkpoint_model(path: str) -> Model:
    """The EMA transformer of a trained run (and its tokenizer, for --quality)."""
    from maskgen import bundle as bundle_lib
    bundle = bundle_lib.load(path)
    return Model(os.path.basename(os.path.abspath(path)), bundle.transformer,
                 bundle.params["transformer"], bundle.config, bundle)


def decode_config(model: Model, steps: int, guidance_scale: Optional[float]):
    """The config's decoding options at T steps; guidance only when asked for."""
    return decode_config_from(model.cfg.sampling, token_grid(model.cfg), steps=steps,
                              guidance_scale=guidance_scale)


def model_fns(model: Model):
    """(plain, full-with-cache, cheap) callables of (params, ...) asking for codebook logits only."""
    module, n = model.module, model.layout.codebook_size

    def plain(params, ids):
        return module.apply({"params": params}, ids, num_logits=n)

    def full(params, ids):
        return module.apply({"params": params}, ids, num_logits=n, method="forward_with_kv")

    def cheap(params, ids, positions, cache):
        return module.apply({"params": params}, ids, positions, cache, num_logits=n,
                            method="forward_subset")

    return plain, full, cheap


def make_decoder(model: Model, case: Case, guidance_scale) -> Callable:
    """jit(params, ids, keys) -> tokens for one case (plain decode or decode_recap)."""
    plain, full, cheap = model_fns(model)
    config = decode_config(model, case.steps, guidance_scale)
    layout = model.layout
    if not case.recap:
        def run(params, ids, keys):
            return scheduler.decode(lambda x: plain(params, x), ids, keys, config, layout).tokens
    else:
        recap = scheduler.RecapConfig(full_only_steps=case.full_only_steps,
                                      cheap_steps=case.cheap_per_full)

        def run(params, ids, keys):
            return scheduler.decode_recap(
                lambda x: full(params, x), lambda x, p, c: cheap(params, x, p, c),
                ids, keys, config, layout, recap).tokens
    return jax.jit(run)


def plan_of(model: Model, case: Case):
    """The static ReCAP plan (a plain decode is K = 0: T groups of one full evaluation)."""
    return scheduler.recap_plan(case.steps, case.full_only_steps, case.cheap_per_full,
                                schedule=model.cfg.sampling.schedule,
                                num_unknown=model.length - 1, length=model.length)


def evaluation_counts(plan) -> Tuple[int, int, Dict[int, int]]:
    """(full evaluations, cheap evaluations, {cheap rows: number of cheap calls with that many rows})."""
    cheap = {}
    for group, rows in zip(plan.groups, plan.cheap_rows):
        if len(group) > 1:
            cheap[rows] = cheap.get(rows, 0) + len(group) - 1
    return plan.num_full, plan.num_cheap, cheap


def flops_per_image(model: Model, plan) -> float:
    """Analytic FLOPs of every evaluation of one image's decode (x2 under guidance is added by caller)."""
    t = model.cfg.transformer
    length, n = model.length, model.layout.codebook_size
    full = flops.transformer_flops(t.num_layers, t.hidden_size, t.mlp_dim, length, n)
    total = plan.num_full * full
    for rows, calls in evaluation_counts(plan)[2].items():
        total += calls * flops.transformer_flops(t.num_layers, t.hidden_size, t.mlp_dim, length, n,
                                                 rows=rows)
    return float(total)


def start_ids(model: Model, batch: int, seed: int = 0):
    """[B, L] all-unknown sequences with random class tokens, and per-example keys."""
    layout = model.layout
    labels = np.random.default_rng(seed).integers(0, layout.num_real_classes, batch)
    ids = np.full((batch, model.length), layout.mask_id, np.int32)
    ids[:, 0] = labels + layout.codebook_size
    keys = scheduler.example_keys(seed, jnp.arange(batch))
    return jnp.asarray(ids), keys


class Timer:
    """Best-of / median wall and process-CPU times of named, compiled calls, across repeats.

    CPU time (all threads of this process) barely moves when other processes
    load the machine, where wall time can double: ratios of CPU times are the
    steadier figures on a shared machine, wall times the ones a user sees.
    """

    def __init__(self):
        self.times: Dict[object, List[float]] = {}
        self.cpu_times: Dict[object, List[float]] = {}

    def __call__(self, name, fn, *args, calls: int = 1):
        for _ in range(calls):
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            self.times.setdefault(name, []).append(time.perf_counter() - start)
            self.cpu_times.setdefault(name, []).append(time.process_time() - cpu_start)

    def best(self, name) -> float:
        return min(self.times[name])

    def median(self, name) -> float:
        return float(np.median(self.times[name]))

    def best_cpu(self, name) -> float:
        return min(self.cpu_times[name])


def eval_probe(fn, count: int):
    """jit(params, *inputs) running `count` chained evaluations of fn in one program.

    Each evaluation's input depends on the previous output (through a term that
    is always zero but that XLA cannot prove so), so no evaluation is hoisted or
    dropped, and one dispatch is shared by all: per-evaluation time without
    host overhead, as inside the decode loop. count = 1 is the jitted fn itself.
    """
    if count == 1:  # a plain call: a loop around a single evaluation only adds its own cost
        return jax.jit(fn)

    def probe(params, ids, *rest):
        def body(_, carry):
            ids_in, acc = carry
            out = fn(params, ids_in + (acc > 3e38).astype(ids_in.dtype), *rest)
            logits = out[0] if isinstance(out, tuple) else out
            # Sum every logit: a single element would let XLA slice the head (and more) away.
            return ids_in, acc + jnp.sum(logits)
        return jax.lax.fori_loop(0, count, body, (ids, jnp.float32(0)))[1]
    return jax.jit(probe)


def probe_count(eval_flops: float, target_flops: float = 2e9, cap: int = 64) -> int:
    """Evaluations per probe: enough that a tiny model's probe is not dispatch-dominated."""
    return int(np.clip(round(target_flops / max(eval_flops, 1.0)), 1, cap))


def eval_probes(model: Model, batch: int, cheap_rows):
    """Compiled model-evaluation probes at the decode's shapes: {name: (fn, args, evaluations)}.

    `full` is the plain forward; with cheap_rows (a set, possibly empty) also
    `full_kv` (the ReCAP full evaluation, which returns every layer's K/V) and
    `cheap_R` for every cheap-row count R the ReCAP decodes use.
    """
    plain, full, cheap = model_fns(model)
    ids = jax.random.randint(jax.random.key(1), (batch, model.length), 0, model.layout.codebook_size)
    shapes = {"full": (plain, (model.params, ids), None)}
    if cheap_rows is not None:
        shapes["full_kv"] = (full, (model.params, ids), None)
        cache = jax.jit(full)(model.params, ids)[1]
        for rows in sorted(cheap_rows):
            # The compiled loop may pad a group past L rows (padding repeats the class row).
            positions = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32) % model.length, (batch, rows))
            shapes[f"cheap_{rows}"] = (cheap, (model.params, jnp.take_along_axis(ids, positions, axis=1),
                                               positions, cache), rows)
    t = model.cfg.transformer
    probes = {}
    for name, (fn, args, rows) in shapes.items():
        count = probe_count(batch * flops.transformer_flops(
            t.num_layers, t.hidden_size, t.mlp_dim, model.length, model.layout.codebook_size, rows))
        probe = eval_probe(fn, count)
        jax.block_until_ready(probe(*args))  # compile outside the timing
        probes[name] = (probe, args, count)
    return probes


def measure(model: Model, cases, batch: int, repeats: int, guidance_scale=None,
            matmul_n: int = 1024, log=print):
    """Times every case and its model evaluations, interleaved. Returns ({case: stats}, matmul FLOP/s)."""
    model_batch = batch * (2 if guidance_scale is not None else 1)
    plans = {case: plan_of(model, case) for case in cases}
    rows_needed = {rows for case in cases if case.recap for rows in evaluation_counts(plans[case])[2]}
    recap_used = any(case.recap for case in cases)
    probes = eval_probes(model, model_batch, rows_needed if recap_used else None)
    ids, keys = start_ids(model, batch)
    decoders = {}
    for case in cases:
        start = time.perf_counter()
        decoders[case] = make_decoder(model, case, guidance_scale)
        jax.block_until_ready(decoders[case](model.params, ids, keys))
        log(f"  compiled {describe(case)} in {time.perf_counter() - start:.1f} s")
    matmul = jax.jit(lambda a, b: a @ b)
    square = jax.random.normal(jax.random.key(2), (matmul_n, matmul_n), jnp.float32)
    jax.block_until_ready(matmul(square, square))
    timer = Timer()
    for repeat in range(repeats):
        # Alternate the order so that a change of machine load favours no case.
        order = cases if repeat % 2 == 0 else cases[::-1]
        timer("matmul", matmul, square, square, calls=5)
        for name, (probe, args, _) in probes.items():
            timer(name, probe, *args, calls=2)
        for case in order:
            timer(case, decoders[case], model.params, ids, keys)
        log(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{describe(case)} {timer.times[case][-1]:.2f} s" for case in cases))
    matmul_flops = 2.0 * matmul_n ** 3
    peak = dict(wall=matmul_flops / timer.best("matmul"), cpu=matmul_flops / timer.best_cpu("matmul"))
    stats = {}
    for clock, best in (("wall", timer.best), ("cpu", timer.best_cpu)):
        per_eval = {name: best(name) / count for name, (_, _, count) in probes.items()}
        for case in cases:
            full, cheap, cheap_rows = evaluation_counts(plans[case])
            # Every full evaluation is charged at the plain forward's cost, ReCAP's too: inside
            # the decode XLA feeds the per-layer K/V straight to the cheap steps (and drops
            # them for full-only groups), while a standalone forward_with_kv also writes the
            # stacked cache (~10% more at medium), which would inflate the bound.
            full_s = per_eval["full"]
            model_s = full * full_s + sum(calls * per_eval[f"cheap_{rows}"]
                                          for rows, calls in cheap_rows.items())
            entry = stats.setdefault(case, dict(plan=plans[case]))
            if clock == "wall":
                entry.update(decode_s=best(case), decode_s_median=timer.median(case), model_s=model_s,
                             full_eval_s=full_s, full_kv_eval_s=per_eval.get("full_kv"),
                             cheap_eval_s={str(r): per_eval[f"cheap_{r}"] for r in cheap_rows})
            else:
                entry.update(decode_cpu_s=best(case), model_cpu_s=model_s)
    return stats, peak


def describe(case: Case) -> str:
    if not case.recap:
        return f"plain T={case.steps}"
    return f"recap T={case.steps} K={case.cheap_per_full} P={case.full_only_steps}"


def build_cases(model: Model, steps, methods, cheap_per_full, full_only_steps):
    """[(mode, case, matched-to case or None)] in a stable order; equal cases are timed once."""
    entries = []
    for t in steps:
        if "plain" in methods:
            entries.append(("plain", Case(t), None))
        for k in cheap_per_full:
            recap = Case(t, k, full_only_steps)
            if "recap" in methods:
                entries.append(("recap", recap, None))
            if "matched" in methods:
                entries.append(("matched", Case(plan_of(model, recap).num_full), recap))
    return entries


def device_description() -> str:
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform} {device.device_kind} x{jax.device_count()}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {cpu}, {os.cpu_count()} cores"


def make_rows(model: Model, entries, stats, batch: int, peak: dict, guidance_scale, repeats: int,
              note: str = ""):
    """JSON rows (see module docstring) incl. ReCAP speed-up vs plain at the same T and its bound."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    guided = 2 if guidance_scale is not None else 1
    rows = []
    for mode, case, matched_to in entries:
        s = stats[case]
        plan = s["plan"]
        per_image = guided * flops_per_image(model, plan)
        images_per_s = batch / s["decode_s"]
        images_per_cpu_s = batch / s["decode_cpu_s"]
        row = dict(
            config=model.name, batch=batch, steps=case.steps,
            method="recap" if case.recap else "plain", mode=mode,
            full_evals=plan.num_full, cheap_evals=plan.num_cheap,
            images_per_s=images_per_s, images_per_s_median=batch / s["decode_s_median"],
            flops_per_image=per_image, quality=None,
            decode_s=s["decode_s"], model_s=s["model_s"],
            full_eval_s=s["full_eval_s"], full_kv_eval_s=s["full_kv_eval_s"],
            cheap_eval_s=s["cheap_eval_s"],
            matmul_flops_per_s=peak["wall"], mfu=images_per_s * per_image / peak["wall"],
            loop_overhead=1.0 - s["model_s"] / s["decode_s"],
            decode_cpu_s=s["decode_cpu_s"], model_cpu_s=s["model_cpu_s"],
            images_per_cpu_s=images_per_cpu_s, matmul_flops_per_cpu_s=peak["cpu"],
            mfu_cpu=images_per_cpu_s * per_image / peak["cpu"],
            loop_overhead_cpu=1.0 - s["model_cpu_s"] / s["decode_cpu_s"],
            recap_full_only_steps=case.full_only_steps, recap_cheap_per_full=case.cheap_per_full,
            cheap_rows=[r for r in plan.cheap_rows if r],
            cheap_calls={str(rows): calls for rows, calls in evaluation_counts(plan)[2].items()},
            schedule=str(model.cfg.sampling.schedule),
            guidance_scale=guidance_scale, repeats=repeats, device=device_description(),
            attention=str(model.cfg.transformer.get("attention", "scan")),
            date=date, jax=jax.__version__, note=note, **hardware.cpu_info())
        plain = stats.get(Case(case.steps))
        if case.recap and plain is not None:
            row["speedup_vs_plain"] = plain["decode_s"] / s["decode_s"]
            row["speedup_bound"] = plain["model_s"] / s["model_s"]
            row["bound_fraction"] = row["speedup_vs_plain"] / row["speedup_bound"]
            row["speedup_vs_plain_cpu"] = plain["decode_cpu_s"] / s["decode_cpu_s"]
            row["speedup_bound_cpu"] = plain["model_cpu_s"] / s["model_cpu_s"]
            row["bound_fraction_cpu"] = row["speedup_vs_plain_cpu"] / row["speedup_bound_cpu"]
        if matched_to is not None:
            row.update(matched_steps=matched_to.steps,
                       matched_recap_cheap_per_full=matched_to.cheap_per_full,
                       matched_recap_full_only_steps=matched_to.full_only_steps)
        rows.append(row)
    return rows


def fashion_quality_fn(cache_dir: str):
    """quality(images, labels) -> Fashion-MNIST metrics dict (classifier trained once, cached)."""
    from maskgen.data import load_fashion_mnist_idx
    from maskgen.eval.fashion import fashion_quality
    train, test = load_fashion_mnist_idx("train"), load_fashion_mnist_idx("test")

    def quality(images, labels):
        report = fashion_quality(images, labels, cache_dir, train=train, test=test, progress=False)
        return {k: v for k, v in report.items() if k != "per_class_accuracy"}
    return quality


def add_quality(model: Model, rows, quality_fn, num_samples: int, batch: int, guidance_scale, seed=0,
                log=print):
    """Decodes pixels for every row's setting and attaches quality_fn(images, labels) as row['quality']."""
    from maskgen.sampling import Sampler
    if model.bundle is None:
        raise ValueError("--quality needs --checkpoint: a trained model with a tokenizer")
    num_classes = model.layout.num_real_classes
    labels = np.arange(num_samples) % num_classes
    cache = {}
    for row in rows:
        key = (row["steps"], row["recap_cheap_per_full"], row["recap_full_only_steps"])
        if key not in cache:
            recap = None
            if row["recap_cheap_per_full"]:
                recap = scheduler.RecapConfig(full_only_steps=row["recap_full_only_steps"],
                                              cheap_steps=row["recap_cheap_per_full"])
            sampler = Sampler(model.bundle, decode_config(model, row["steps"], guidance_scale), recap)
            out = sampler.generate(labels, seed=seed, batch_size=batch, progress=False)
            cache[key] = quality_fn(out["images"], out["labels"])
            log(f"  quality T={key[0]} K={key[1]} P={key[2]}: {cache[key]}")
        row["quality"] = cache[key]
        row["quality_samples"] = num_samples
    return rows


def check_args(args):
    """Validates parsed arguments (ValueError naming the flag); returns (steps, batches, K list, methods)."""
    steps = parse_int_list(args.steps, "steps", 1)
    batches = parse_int_list(args.batch, "batch", 1)
    cheap = parse_int_list(args.recap_cheap_per_full, "recap_cheap_per_full", 1)
    methods = parse_methods(args.methods)
    if args.recap_full_only_steps < 0:
        raise ValueError(f"--recap_full_only_steps must be >= 0, got {args.recap_full_only_steps}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if bool(args.config) == bool(args.checkpoint):
        raise ValueError("pass exactly one of --config (random weights) and --checkpoint (trained run)")
    if args.quality and not args.checkpoint:
        raise ValueError("--quality needs --checkpoint (a trained Fashion-MNIST run)")
    if args.set and not args.config:
        raise ValueError("--set changes a --config; a --checkpoint keeps the size it was trained at")
    if args.quality and args.quality_samples < 2:
        raise ValueError(f"--quality_samples must be >= 2, got {args.quality_samples}")
    return steps, batches, cheap, methods


def run(args, log=print):
    """Runs the benchmark for parsed arguments; returns the rows (also written to args.out)."""
    steps, batches, cheap, methods = check_args(args)
    model = (checkpoint_model(args.checkpoint) if args.checkpoint
             else random_model(args.config, overrides=args.set))
    entries = build_cases(model, steps, methods, cheap, args.recap_full_only_steps)
    cases = list(dict.fromkeys(case for _, case, _ in entries))
    rows = []
    for batch in batches:
        log(f"{model.name}: batch {batch}, " + "; ".join(describe(c) for c in cases))
        stats, peak = measure(model, cases, batch, args.repeats, args.guidance_scale, args.matmul_n, log)
        rows += make_rows(model, entries, stats, batch, peak, args.guidance_scale, args.repeats,
                          args.note)
    if args.quality:
        quality_fn = args.quality_fn or fashion_quality_fn(args.cache_dir)
        add_quality(model, rows, quality_fn, args.quality_samples, max(batches), args.guidance_scale,
                    log=log)
    for row in rows:
        log(summary_line(row))
    if args.out:
        write_rows(rows, args.out)
    if args.quality and args.plot:
        from plot_decode import plot_quality  # bench/ sibling module
        plot_quality(rows, args.plot)
        log(f"wrote {args.plot}")
    return rows


def summary_line(row) -> str:
    text = (f"{row['config']} B={row['batch']} T={row['steps']} {row['mode']:7s} "
            f"K={row['recap_cheap_per_full']} P={row['recap_full_only_steps']}: "
            f"{row['full_evals']}+{row['cheap_evals']} evals, {row['images_per_s']:.2f} images/s, "
            f"MFU {100 * row['mfu']:.0f}%, loop {100 * row['loop_overhead']:.1f}%")
    if "speedup_vs_plain" in row:
        text += (f", x{row['speedup_vs_plain']:.2f} vs plain (bound x{row['speedup_bound']:.2f}, "
                 f"{100 * row['bound_fraction']:.0f}%)")
    text += f" | cpu-time: MFU {100 * row['mfu_cpu']:.0f}%, loop {100 * row['loop_overhead_cpu']:.1f}%"
    if "speedup_vs_plain_cpu" in row:
        text += f", x{row['speedup_vs_plain_cpu']:.2f} (bound x{row['speedup_bound_cpu']:.2f})"
    return text


def write_rows(rows, path: str):
    """Writes the JSON list atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config name in configs/ (or a file): random weights at its size")
    p.add_argument("--checkpoint", help="training workdir: its EMA transformer (and tokenizer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a --config entry, e.g. --set transformer.hidden_size=64 (repeatable)")
    p.add_argument("--batch", default="8", help="batch size(s), e.g. 8 or 8,1")
    p.add_argument("--steps", default="8", help="decoding steps T, e.g. 8,12")
    p.add_argument("--methods", default="plain,recap,matched", help="subset of plain,recap,matched")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best-of and median kept)")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance weight (default: off)")
    p.add_argument("--matmul_n", type=int, default=1024, help="size of the n x n x n matmul peak probe")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. what was changed)")
    p.add_argument("--out", default=None, help="JSON rows file (e.g. bench/results/decode-medium.json)")
    recap = p.add_argument_group("recap")
    recap.add_argument("--recap_cheap_per_full", default="1,2,3",
                       help="K, cheap evaluations per full one (list allowed)")
    recap.add_argument("--recap_full_only_steps", type=int, default=0, help="P, leading full-only steps")
    quality = p.add_argument_group("quality (with --checkpoint of a Fashion-MNIST run)")
    quality.add_argument("--quality", action="store_true", help="score generated images of every mode")
    quality.add_argument("--quality_samples", type=int, default=1000)
    quality.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/maskgen"),
                         help="where the Fashion-MNIST classifier is cached")
    quality.add_argument("--plot", default=os.path.join(RESULTS_DIR, "decode-quality.png"),
                         help="quality-vs-time plot (PNG)")
    p.set_defaults(quality_fn=None)
    return p


def main(argv=None):
    p = parser()
    # --config.a.b=value (train.py's override syntax) works as --set a.b=value.
    rest, config_flags = config_io.split_config_flags(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    args.set = list(args.set) + config_flags
    try:
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    return run(args)


if __name__ == "__main__":
    from maskgen import cpu_host
    cpu_host.restart_with_cpu_settings()  # as train.py does on CPU-only hosts (rows record cpu_hugepages)
    main()
