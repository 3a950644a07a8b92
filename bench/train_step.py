"""Train-step throughput and model-FLOPs utilisation (MFU) of both stages.

    python bench/train_step.py   # transformer: debug, medium; tokenizer: debug, fashion_mnist
    python bench/train_step.py --config=medium --batch=32 --tokenizer_config=debug
    python bench/train_step.py --config=imagenet256 --batch=256 --dtype=bfloat16   # on a GPU/TPU

For each config: the sharded transformer train step (all devices, batch over
data) on random tokens, timed over `--steps` steps after compilation, gives
tokens/s and achieved FLOP/s, where model FLOPs = 3 x the analytic forward
count (`maskgen.flops`, matmuls only; XLA's own count is recorded beside it).
The fraction of the dense-matmul FLOP/s measured in the same process (an
n x n fp32 matmul, and a bf16 one when the step runs in bf16) is the MFU. The
tokenizer (VQGAN + discriminator) step is timed the same way with XLA's FLOP
count. One JSON row per measurement is appended to bench/results/train_step.json.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maskgen import config_io, flops, hardware  # noqa: E402
from maskgen import sharding as shd  # noqa: E402
from maskgen.models import factory
from maskgen.models.sizes import seq_len, token_layout  # noqa: E402
from maskgen.training import optimizer, train_state  # noqa: E402
from maskgen.training import tokenizer_step as tts  # noqa: E402
from maskgen.training import transformer_step as tst  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results", "train_step.json")


def load_config(name: str, batch: int, dtype: str, overrides=()):
    """A config by name or path, at the bench's batch and dtype, with `--config.a.b=v` overrides."""
    cfg = config_io.apply_overrides(config_io.resolve_config(name), overrides)
    cfg.batch_size = batch
    if dtype:
        cfg.transformer.dtype = dtype
        cfg.tokenizer.dtype = dtype
    return cfg


def _time(step, state, batch, key, steps: int):
    """(compile+first step seconds, mean seconds per step, xla flops per step, final state)."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float((cost or {}).get("flops", float("nan")))
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready((state, metrics))
    return first, (time.perf_counter() - t0) / steps, xla_flops, state


def _jit(step_fn, shardings, batch_sh, mesh):
    return shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                           (shardings, shd.replicated(mesh)), donate_argnums=(0,))


def bench_transformer(cfg, mesh, steps: int):
    layout, length = token_layout(cfg), seq_len(cfg)
    model = factory.transformer_model(cfg)
    tcfg = cfg.transformer_train
    tx, lr = optimizer.adamw(tcfg, 1000)
    step_fn = tst.make_train_step(model, layout, tx, lr, tcfg, tcfg.ema_decay)
    state, shardings, _ = train_state.init_sharded(tst.make_init(model, tx, length), jax.random.key(0), mesh)
    b = cfg.batch_size
    rng = np.random.default_rng(0)
    local = dict(tokens=rng.integers(0, layout.codebook_size, (b, length - 1)).astype(np.int32),
                 label=rng.integers(0, layout.num_real_classes, (b,)).astype(np.int32))
    batch = shd.global_batch(local, mesh)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    key = jax.device_put(jax.random.key(1), shd.replicated(mesh))
    first, dt, xla_flops, _ = _time(_jit(step_fn, shardings, batch_sh, mesh), state, batch, key, steps)
    t = cfg.transformer
    forward = flops.transformer_flops(t.num_layers, t.hidden_size, t.mlp_dim, length, layout.codebook_size)
    model_flops = 3.0 * forward * b
    return dict(stage="transformer", seq_len=length, step_time_s=dt, compile_and_first_s=first,
                tokens_per_s=b * length / dt, images_per_s=b / dt, model_flops_per_step=model_flops,
                xla_flops_per_step=xla_flops * mesh.size, achieved_flops_per_s=model_flops / dt,
                num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))))


def bench_tokenizer(cfg, mesh, steps: int, batch: int):
    vqgan, disc = factory.tokenizer_model(cfg), factory.discriminator_model(cfg)
    tcfg = cfg.tokenizer_train
    with tcfg.unlocked():
        tcfg.disc_start_step = 0  # time the full step (generator + discriminator + R1)
    tx, lr = optimizer.adamw(tcfg, 1000)
    disc_tx, _ = optimizer.adamw(tcfg, 1000, learning_rate=tcfg.disc_learning_rate)
    step_fn = tts.make_train_step(vqgan, disc, tx, disc_tx, lr, tcfg, tcfg.ema_decay)
    shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    init = tts.make_init(vqgan, disc, tx, disc_tx, shape, tcfg)
    state, shardings, _ = train_state.init_sharded(init, jax.random.key(0), mesh)
    rng = np.random.default_rng(0)
    local = dict(image=rng.random((batch,) + shape, np.float32), label=np.zeros((batch,), np.int32))
    gbatch = shd.global_batch(local, mesh)
    key = jax.device_put(jax.random.key(1), shd.replicated(mesh))
    step = _jit(step_fn, shardings, jax.tree.map(lambda x: x.sharding, gbatch), mesh)
    first, dt, xla_flops, _ = _time(step, state, gbatch, key, steps)
    total = xla_flops * mesh.size
    return dict(stage="tokenizer", step_time_s=dt, compile_and_first_s=first, images_per_s=batch / dt,
                xla_flops_per_step=total, achieved_flops_per_s=total / dt,
                num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))))


def append_rows(rows, path=RESULTS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    with open(path + ".tmp", "w") as f:
        json.dump(existing + rows, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="transformer config: name in configs/ or a path "
                             "(repeatable; default debug, medium)")
    parser.add_argument("--tokenizer_config", action="append",
                        help="tokenizer config (repeatable; default debug, fashion_mnist)")
    parser.add_argument("--batch", type=int, default=32, help="global transformer batch")
    parser.add_argument("--tokenizer_batch", type=int, default=8, help="global tokenizer batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    parser.add_argument("--dtype", default="", help="activation dtype override (e.g. bfloat16)")
    parser.add_argument("--matmul_n", type=int, default=0, help="matmul size for the peak (0: auto)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--note", default="")
    # --config.a.b=value (train.py's override syntax) applies to every config benchmarked.
    rest, overrides = config_io.split_config_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    jobs = [("transformer", n) for n in args.config or ["debug", "medium"]]
    jobs += [("tokenizer", n) for n in args.tokenizer_config or ["debug", "fashion_mnist"]]
    mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    device = jax.devices()[0]
    n = args.matmul_n or (8192 if device.platform != "cpu" else 1024)
    peak32 = flops.matmul_flops_per_s(n, jnp.float32)
    peak16 = flops.matmul_flops_per_s(n, jnp.bfloat16) if args.dtype == "bfloat16" else None
    common = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  platform=device.platform, device_kind=device.device_kind, device_count=mesh.size,
                  host=platform.node(), jax=jax.__version__, matmul_n=n,
                  matmul_fp32_flops_per_s=peak32, matmul_bf16_flops_per_s=peak16, note=args.note,
                  **hardware.cpu_info())
    rows = []
    for stage, name in jobs:
        cfg = load_config(name, args.batch, args.dtype, overrides)
        if stage == "transformer":
            r = bench_transformer(cfg, mesh, args.steps)
        else:
            r = bench_tokenizer(cfg, mesh, args.steps, args.tokenizer_batch)
        peak = peak16 if peak16 else peak32
        row = dict(common, config=name, dtype=str(cfg.transformer.dtype), overrides=list(overrides),
                   attention=str(cfg.transformer.get("attention", "scan")),
                   remat=str(cfg.transformer.get("remat", "none")),
                   prng_impl=str(cfg.get("prng_impl", "threefry2x32")),
                   batch=args.batch if stage == "transformer" else args.tokenizer_batch,
                   mfu=r["achieved_flops_per_s"] / peak, **r)
        rows.append(row)
        extra = f", {row['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in row else ""
        print(f"{name:12s} {stage:11s} batch {row['batch']:4d}: {r['step_time_s'] * 1e3:8.1f} ms/step, "
              f"{row['images_per_s']:.1f} images/s{extra}, {r['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s "
              f"= {100 * row['mfu']:.1f}% of matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    append_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    from maskgen import cpu_host
    cpu_host.restart_with_cpu_settings()  # as train.py does on CPU-only hosts (rows record cpu_hugepages)
    main()
