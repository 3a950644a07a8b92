"""maskgen's real sharded programs compiled for a TPU topology on a CPU host, or exported for GPU.

    python bench/compile.py --config=debug --topology=v5e:2x2 --out FILE.json
    python bench/compile.py --config=imagenet256 --topology=v5e:16x16 --config.mesh.fsdp=16 \\
        --programs=transformer_train_step --out FILE.json
    python bench/compile.py --config=debug --platform=cuda --out FILE.json

TPU (needs libtpu: `pip install -e '.[tpu]'`): the mesh of `cfg.mesh` is laid
over the devices of `jax.experimental.topologies.get_topology_desc` and each
program is lowered from abstract, sharded inputs (`jax.eval_shape`, nothing is
initialised, so pod-size configs need no memory) and compiled by libtpu. A row
per program gives the per-chip bytes of `memory_analysis()` (arguments,
outputs, temporaries; total = arguments + outputs - aliased (donated) +
temporaries + code), the chip's HBM, whether it fits, and XLA's FLOPs
(`flops` = all chips, `flops_per_chip` = the per-device program). A program
the TPU compiler rejects for memory gets `fits` false and the compiler's
message. GPU (`--platform=cuda`): programs cannot be compiled without a GPU, so
they are exported (`jax.export`, platforms=['cuda']) on a mesh of CPU devices
(`--devices`, forced host devices) and the custom-call targets of the exported
StableHLO are listed: the check that a fused kernel (cuDNN attention) is in the
program.

Programs: transformer_train_step (activations in --dtype, default bfloat16, the
configured attention and remat), tokenizer_train_step (VQGAN + discriminator
+ R1, the discriminator on from step 0), decode (plain MaskGIT, tokens only)
and decode_recap (ReCAP with K = sampling.recap_cheap_per_full, or
--recap_cheap_per_full when the config has 0). Parameters and optimizer state
use `maskgen.sharding`'s rules; batches are split over data x fsdp; the models'
activation marks are live (`sharding_constraints` counts them in the lowering).

`--config` takes a name in configs/ or a path; `--config.a.b=value` overrides
any key (e.g. `--config.mesh.fsdp=4`, `--config.transformer.attention=xla`).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import platform as host_platform
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

PROGRAMS = ("transformer_train_step", "tokenizer_train_step", "decode", "decode_recap")
GiB = 1 << 30
# Per chip, from the Cloud TPU system-architecture pages. v4 and v5p are used in megacore mode
# (one device per chip, both TensorCores), as MaxText does. Hosts have 2x2x1 chips on each.
TPU_CHIPS = {
    "v4": dict(hbm_bytes=32 * GiB, chip_config_name="megacore"),
    "v5e": dict(hbm_bytes=16 * GiB, chip_config_name="default"),
    "v5p": dict(hbm_bytes=95 * GiB, chip_config_name="default"),
    "v6e": dict(hbm_bytes=32 * GiB, chip_config_name="default"),
}
TOPOLOGY_EXAMPLES = ("v5e:2x2", "v5e:16x16 (256 chips)", "v4:2x2x1", "v4:8x8x4 (256 chips)",
                     "v5p:2x2x1", "v5p:8x8x4 (256 chips)", "v6e:2x2")
# cuDNN fused-attention targets have no export compatibility guarantee; allowed so they can be listed.
CUDNN_TARGETS = tuple(f"__cudnn${name}" for name in (
    "fmhaSoftmax", "fmhaScaleBiasSoftmax", "fmhaSoftmaxDropout", "fmhaScaleBiasSoftmaxDropout",
    "fmhaSoftmaxF8", "fmhaSoftmaxBackward", "fmhaScaleBiasSoftmaxBackward", "fmhaSoftmaxDropoutBackward",
    "fmhaScaleBiasSoftmaxDropoutBackward", "fmhaSoftmaxBackwardF8"))
_CONSTRAINT = re.compile(r"sdy\.sharding_constraint|custom_call @Sharding\b")
_CUSTOM_CALL = re.compile(r'custom_call\s+@"?([^"(\s]+)"?|call_target_name\s*=\s*"([^"]+)"')
# The TPU compiler's out-of-memory messages: "... HLO temporaries (27.21G) exceeds available HBM (15.75G)",
# or "Used 20.1G of 15.75G hbm".
_OOM_NEED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")
_OOM_LIMIT = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)|of ([\d.]+)([KMGT]?) hbm")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of")


def parse_topology(name: str) -> Tuple[str, int]:
    """(chip generation, chips) of 'v5e:4x4'; unknown names raise with examples."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name or "")
    if not m or m.group(1) not in TPU_CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: expected GENERATION:AxB[xC] with generation in "
                         f"{sorted(TPU_CHIPS)}, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    return m.group(1), math.prod(int(d) for d in m.group(2).split("x"))


def tpu_devices(name: str) -> list:
    """Compile-only TPU devices of a topology (one per chip); hosts of up to 2x2x1 chips."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard, no lockfile
    generation, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("compiling for TPU needs libtpu: pip install -e '.[tpu]' "
                         "(the same jax[tpu] version as the installed jax)")
    dims = [int(d) for d in name.split(":")[1].split("x")]
    host_bounds = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(
            topology_name=name, platform="tpu", chip_config_name=TPU_CHIPS[generation]["chip_config_name"],
            chips_per_host_bounds=host_bounds, num_slices=1)
    except Exception as e:  # JaxRuntimeError from libtpu
        raise ValueError(f"libtpu rejects TPU topology {name!r} ({type(e).__name__}: {str(e)[:300]}); "
                         f"examples: {', '.join(TOPOLOGY_EXAMPLES)}") from e
    devices = list(desc.devices)
    if len(devices) != chips:
        raise ValueError(f"topology {name!r}: expected {chips} devices (one per chip), got {len(devices)}")
    return devices


def parse_programs(text: str) -> Tuple[str, ...]:
    names = tuple(p.strip() for p in (text or "").split(",") if p.strip()) or PROGRAMS
    bad = [p for p in names if p not in PROGRAMS]
    if bad:
        raise ValueError(f"unknown program {bad[0]!r}; choose from {', '.join(PROGRAMS)}")
    return names


def load_config(name: str, overrides: Sequence[str]):
    """A config by name or path with `--config.a.b=value` overrides (ml_collections' own parsing)."""
    from absl import flags
    from ml_collections import config_flags

    from maskgen import config_io
    cfg = config_io.resolve_config(name)
    argv = ["compile.py", *overrides]
    values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", cfg, flag_values=values, sys_argv=argv)
        values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise ValueError(f"config {name!r}: cannot apply overrides {list(overrides)}: "
                         f"{type(e).__name__} {e}") from e
    return values.config


def host_description() -> Dict[str, str]:
    """CPU model and the widest vector ISA of this host (compile times depend on both)."""
    cpu, flags_line = host_platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", "unknown", host_platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags_line:
                    flags_line = line
    except OSError:
        pass
    have = set(flags_line.split(":", 1)[-1].split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2"))
                if flag in have), host_platform.machine())
    if "amx_tile" in have:
        isa += "+AMX"
    return dict(host_cpu=cpu, host_isa=isa, host_cores=str(os.cpu_count()))


def _cost_flops(compiled) -> Optional[float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    value = (cost or {}).get("flops")
    return None if value is None else float(value)


def _bytes(value: str, unit: str) -> int:
    return int(float(value) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB, "T": 1 << 40}[unit])


class Program:
    """One program to compile: a jitted function and the abstract, sharded arguments it takes."""

    def __init__(self, name: str, jitted, args: tuple, global_batch: int, extra: Optional[dict] = None):
        self.name, self.jitted, self.args, self.global_batch = name, jitted, args, global_batch
        self.extra = dict(extra or {})


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _key_struct(mesh, shape=()):
    import jax

    from maskgen import sharding as shd
    sharding = shd.replicated(mesh) if not shape else shd.batch_sharding(mesh, 1)
    return jax.ShapeDtypeStruct(shape, jax.random.key(0).dtype, sharding=sharding)


def _check_batch(batch: int, mesh, what: str):
    from maskgen import sharding as shd
    if batch % shd.batch_divisor(mesh):
        raise ValueError(f"{what} batch {batch} is not divisible by the {shd.batch_divisor(mesh)} devices "
                         f"of the mesh's data x fsdp axes {dict(mesh.shape)}")


def transformer_programs(cfg, mesh, names: Sequence[str], batch: int, decode_batch: int,
                         recap_cheap: int) -> List[Program]:
    """The transformer's train step and its plain / ReCAP decodes on `mesh`."""
    import jax
    import jax.numpy as jnp

    from maskgen import scheduler
    from maskgen import sharding as shd
    from maskgen.models import factory
    from maskgen.models.sizes import seq_len, token_grid, token_layout
    from maskgen.sampling import decode_config_from
    from maskgen.training import optimizer, train_state
    from maskgen.training import transformer_step as tst

    layout, length = token_layout(cfg), seq_len(cfg)
    model = factory.transformer_model(cfg)
    tcfg = cfg.transformer_train
    tx, lr = optimizer.adamw(tcfg, int(tcfg.get("num_train_steps") or cfg.num_train_steps))
    init = tst.make_init(model, tx, length)
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    abstract, shardings = train_state.abstract_and_shardings(init, mesh, rules)
    programs = []
    if "transformer_train_step" in names:
        _check_batch(batch, mesh, "transformer train")
        step_fn = tst.make_train_step(model, layout, tx, lr, tcfg, tcfg.ema_decay)
        batch_sh = {"tokens": shd.batch_sharding(mesh, 2), "label": shd.batch_sharding(mesh, 1)}
        args = (train_state.sharded_abstract(abstract, shardings),
                {"tokens": jax.ShapeDtypeStruct((batch, length - 1), jnp.int32, sharding=batch_sh["tokens"]),
                 "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh["label"])},
                _key_struct(mesh))
        jitted = shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                                 (shardings, shd.replicated(mesh)), donate_argnums=(0,))
        programs.append(Program("transformer_train_step", jitted, args, batch))
    decodes = [n for n in ("decode", "decode_recap") if n in names]
    if decodes:
        _check_batch(decode_batch, mesh, "decode")
        config = decode_config_from(cfg.sampling, token_grid(cfg))
        n = layout.codebook_size
        params_sh = shardings.ema_params
        ids_sh, keys_sh = shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
        args = (_abstract(abstract.ema_params, params_sh),
                jax.ShapeDtypeStruct((decode_batch, length), jnp.int32, sharding=ids_sh),
                _key_struct(mesh, (decode_batch,)))
        for name in decodes:
            extra = dict(decode_steps=config.steps)
            if name == "decode":
                def run(params, ids, keys):
                    def logits(x):
                        return model.apply({"params": params}, x, num_logits=n)
                    return scheduler.decode(logits, ids, keys, config, layout).tokens
            else:
                k = int(cfg.sampling.get("recap_cheap_per_full", 0)) or recap_cheap
                recap = scheduler.RecapConfig(full_only_steps=int(cfg.sampling.get("recap_full_only_steps", 0)),
                                              cheap_steps=k)
                extra.update(recap_cheap_per_full=k, recap_full_only_steps=recap.full_only_steps)

                def run(params, ids, keys, recap=recap):
                    def full(x):
                        return model.apply({"params": params}, x, num_logits=n, method="forward_with_kv")

                    def cheap(x, pos, kv):
                        return model.apply({"params": params}, x, pos, kv, num_logits=n,
                                           method="forward_subset")
                    return scheduler.decode_recap(full, cheap, ids, keys, config, layout, recap).tokens
            jitted = shd.jit_sharded(run, (params_sh, ids_sh, keys_sh), ids_sh)
            programs.append(Program(name, jitted, args, decode_batch, extra))
    return programs


def tokenizer_program(cfg, mesh, batch: int) -> Program:
    """The tokenizer stage's full train step (generator + discriminator + R1) on `mesh`."""
    import jax
    import jax.numpy as jnp

    from maskgen import sharding as shd
    from maskgen.models import factory
    from maskgen.training import optimizer, train_state
    from maskgen.training import tokenizer_step as tts

    _check_batch(batch, mesh, "tokenizer train")
    vqgan, disc = factory.tokenizer_model(cfg), factory.discriminator_model(cfg)
    tcfg = cfg.tokenizer_train
    with tcfg.unlocked():
        tcfg.disc_start_step = 0  # the full step: what must fit
    steps = int(tcfg.get("num_train_steps") or cfg.num_train_steps)
    tx, lr = optimizer.adamw(tcfg, steps)
    disc_tx, _ = optimizer.adamw(tcfg, steps, learning_rate=tcfg.disc_learning_rate)
    step_fn = tts.make_train_step(vqgan, disc, tx, disc_tx, lr, tcfg, tcfg.ema_decay)
    shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    init = tts.make_init(vqgan, disc, tx, disc_tx, shape, tcfg)
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    abstract, shardings = train_state.abstract_and_shardings(init, mesh, rules)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}
    args = (train_state.sharded_abstract(abstract, shardings),
            {"image": jax.ShapeDtypeStruct((batch,) + shape, jnp.float32, sharding=batch_sh["image"]),
             "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh["label"])},
            _key_struct(mesh))
    jitted = shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                             (shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return Program("tokenizer_train_step", jitted, args, batch)


def build_programs(cfg, mesh, names: Sequence[str], batch: int, tokenizer_batch: int, decode_batch: int,
                   recap_cheap: int) -> List[Program]:
    programs = transformer_programs(cfg, mesh, names, batch, decode_batch, recap_cheap)
    if "tokenizer_train_step" in names:
        programs.append(tokenizer_program(cfg, mesh, tokenizer_batch))
    return sorted(programs, key=lambda p: PROGRAMS.index(p.name))


def compile_tpu(program: Program, hbm_bytes: int, chips: int) -> Dict[str, Any]:
    """Lower + compile for TPU; memory, FLOPs, fit (a compiler out-of-memory error is a 'no')."""
    t0 = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    constraints = len(_CONSTRAINT.findall(lowered.as_text()))
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only an HBM overflow is an answer, the rest is a bug
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(fits=False, flops=None, flops_per_chip=None, sharding_constraints=constraints,
                    lower_s=t1 - t0, compile_s=time.perf_counter() - t1, **oom_report(str(e), program))
    compile_s = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    per_chip = _cost_flops(compiled)
    return dict(per_chip_bytes=dict(arguments=int(mem.argument_size_in_bytes),
                                    outputs=int(mem.output_size_in_bytes),
                                    temp=int(mem.temp_size_in_bytes), total=int(total)),
                alias_bytes=int(mem.alias_size_in_bytes), code_bytes=int(mem.generated_code_size_in_bytes),
                fits=bool(total <= hbm_bytes), flops=None if per_chip is None else per_chip * chips,
                flops_per_chip=per_chip, sharding_constraints=constraints,
                lower_s=t1 - t0, compile_s=compile_s)


def argument_bytes_per_chip(args) -> int:
    """Bytes of one device's shards of the abstract arguments."""
    import jax
    def one(x):
        shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
        return math.prod(shape) * x.dtype.itemsize
    return int(sum(one(x) for x in jax.tree.leaves(args)))


def oom_report(message: str, program: Program) -> Dict[str, Any]:
    """Per-chip bytes from a TPU compiler out-of-memory message (arguments from the shardings)."""
    def found(pattern):
        m = pattern.search(message)
        if not m:
            return None
        value, unit = [g for g in m.groups() if g is not None][:2]  # the alternative that matched
        return _bytes(value, unit)
    arguments = argument_bytes_per_chip(program.args)
    temp, used = found(_OOM_NEED), found(_OOM_USED)
    total = used if used is not None else (None if temp is None else arguments + temp)
    first = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    return dict(per_chip_bytes=dict(arguments=arguments, outputs=None, temp=temp, total=total),
                compiler_hbm_limit_bytes=found(_OOM_LIMIT), memory_source="compiler out-of-memory error",
                error=first.strip()[:400])


def custom_call_targets(text: str) -> List[str]:
    """Sorted custom-call target names in StableHLO text (pretty or generic form)."""
    return sorted({a or b for a, b in _CUSTOM_CALL.findall(text)})


def export_cuda(program: Program) -> Dict[str, Any]:
    """Export for CUDA (no compilation without a GPU) and list the custom calls."""
    from jax import export
    t0 = time.perf_counter()
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
    exported = export.export(program.jitted, platforms=["cuda"], disabled_checks=checks)(*program.args)
    text = exported.mlir_module()
    return dict(compiled=False, custom_calls=custom_call_targets(text),
                sharding_constraints=len(_CONSTRAINT.findall(text)), export_s=time.perf_counter() - t0)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="name in configs/ or a config file path")
    parser.add_argument("--topology", default="", help=f"TPU topology, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    parser.add_argument("--platform", default="tpu", choices=("tpu", "cuda"))
    parser.add_argument("--programs", default="", help=f"comma-separated subset of {', '.join(PROGRAMS)}")
    parser.add_argument("--batch", type=int, default=0, help="global transformer batch (0: config)")
    parser.add_argument("--tokenizer_batch", type=int, default=0,
                        help="global tokenizer batch (0: tokenizer_train.batch_size or --batch)")
    parser.add_argument("--decode_batch", type=int, default=0, help="global decode batch (0: --batch)")
    parser.add_argument("--recap_cheap_per_full", type=int, default=2,
                        help="ReCAP K when the config's sampling.recap_cheap_per_full is 0")
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype of both models ('' keeps config)")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the --platform=cuda mesh")
    parser.add_argument("--out", default="", help="JSON file for the rows (default: print only)")
    parser.add_argument("--note", default="")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    if args.platform == "tpu" and not args.topology:
        parser.error("--platform=tpu needs --topology (e.g. v5e:2x2)")
    return args, rest


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args, overrides = _parse_args(sys.argv[1:] if argv is None else list(argv))
    names = parse_programs(args.programs)
    if args.platform == "cuda" and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    if args.platform == "tpu":
        generation, chips = parse_topology(args.topology)
    import jax

    from maskgen import sharding as shd

    cfg = load_config(args.config, overrides)
    if cfg.get("prng_impl"):
        jax.config.update("jax_default_prng_impl", cfg.prng_impl)
    if args.dtype:
        cfg.transformer.dtype = args.dtype
        cfg.tokenizer.dtype = args.dtype
    if args.platform == "tpu":
        devices = tpu_devices(args.topology)
        hbm = TPU_CHIPS[generation]["hbm_bytes"]
    else:
        devices = jax.devices("cpu")[:args.devices]
        if len(devices) < args.devices:
            raise ValueError(f"--devices={args.devices} but only {len(devices)} CPU devices exist "
                             "(XLA_FLAGS was set before this script ran)")
        chips, hbm = len(devices), None
    mesh = shd.make_mesh(cfg.mesh, devices)
    batch = args.batch or int(cfg.transformer_train.get("batch_size") or cfg.batch_size)
    tokenizer_batch = args.tokenizer_batch or int(cfg.tokenizer_train.get("batch_size") or batch)
    programs = build_programs(cfg, mesh, names, batch, tokenizer_batch, args.decode_batch or batch,
                              args.recap_cheap_per_full)
    try:
        import libtpu
        libtpu_version = getattr(libtpu, "__version__", "?")
    except ImportError:
        libtpu_version = None
    common = dict(
        config=os.path.splitext(os.path.basename(args.config))[0], topology=args.topology or None,
        platform=args.platform, attention=str(cfg.transformer.get("attention", "scan")),
        remat=str(cfg.transformer.get("remat", "none")), prng_impl=str(cfg.get("prng_impl", "threefry2x32")),
        dtype=str(cfg.transformer.dtype), mesh={k: int(v) for k, v in mesh.shape.items()}, chips=chips,
        device_kind=devices[0].device_kind, hbm_bytes=hbm, overrides=list(overrides),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__, libtpu=libtpu_version, note=args.note, **host_description())
    rows = []
    for program in programs:
        row = dict(common, program=program.name, global_batch=program.global_batch, **program.extra)
        if args.platform == "tpu":
            row.update(compiled=True, **compile_tpu(program, hbm, chips))
            mem = row["per_chip_bytes"]
            print(f"{row['config']} {args.topology} {program.name:22s} batch {program.global_batch:5d} "
                  f"mesh {row['mesh']}: {mem['total'] / GiB:7.2f} of {hbm / GiB:.0f} GiB per chip "
                  f"({'fits' if row['fits'] else 'does NOT fit'}), compile {row['compile_s']:.0f} s",
                  flush=True)
        else:
            row.update(per_chip_bytes=None, fits=None, flops=None, **export_cuda(program))
            print(f"{row['config']} cuda {program.name:22s} custom calls: {row['custom_calls']}", flush=True)
        rows.append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return rows


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

if __name__ == "__main__":
    main()
