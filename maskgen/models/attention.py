"""Softmax attention by backend: the CPU head-scan kernel, XLA, cuDNN and TPU splash.

`attend(..., implementation=NAME)` runs one of (`config.transformer.attention`):
  scan    today's CPU kernel (below): one head at a time, hand-written backward.
  xla     `jax.nn.dot_product_attention(implementation='xla')` (one-shot
          softmax); with attention dropout a one-shot softmax with our mask.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention`
          (fp16/bf16, head dim a multiple of 8, <= 128 before Hopper, <= 256 from).
  splash  the Pallas TPU splash kernel, sequences padded to a multiple of 128
          (pad keys in their own segment), inside `jax.shard_map` over the
          mesh's batch and head axes; on CPU/GPU it runs in Pallas interpret mode.
  auto    CPU -> scan, GPU -> cudnn where dtype and head dim allow, TPU -> splash.
`resolve_attention` says which one runs and why; when the requested kernel
cannot run a call (wrong platform, dtype, head dim, or attention dropout, which
cudnn and splash lack) the call uses `xla` and the reason is logged once on the
"maskgen" logger. Attention dropout is never dropped: cuDNN's own dropout draws
from a static seed outside `config.prng_impl`, so it is not used.

The scan kernel, why:

Why one head at a time: with the one-shot form (scores for every head in a
[B, H, N, L] einsum, softmax, second einsum) XLA:CPU runs the chain over all
heads at once, and the [B, H, N, L] blocks fall out of cache between the
steps. A `lax.scan` over the heads keeps each [B, N, L] block warm between the
two matmuls; the forward at the medium preset gets ~1.3x faster.

Why normalise after the value matmul: out = (exp(s - max) @ v) / sum(exp(s - max))
is the softmax attention, but the division touches [B, N, K] instead of the
[B, N, L] probabilities (one pass fewer over the largest array).

Why a custom VJP: autodiff through the head scan stores every head's
probabilities and its backward adds dynamic-slice copies (~20% of a train
step). The backward here is the standard flash-attention one per head: it
keeps only the output and the log-sum-exp per query, recomputes the
probabilities from q and k, and forms dq, dk, dv in the same head scan
(~1.6x faster than autodiff at the medium preset, batch 32).

Shape legend: B batch, N queries, L keys, H heads, K head dim.
"""
import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskgen.models.dropout import apply_keep

IMPLEMENTATIONS = ("auto", "scan", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash kv compute blocks must be multiples of 128 lanes
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
logger = logging.getLogger("maskgen")
_logged: set = set()
# Set inside `cudnn_export()`: the platform attention resolves for while exporting.
_export_platform: str | None = None


def check_attention_name(name: str) -> str:
    """The name itself, or a ValueError naming the config key."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"transformer.attention={name!r} is not one of {IMPLEMENTATIONS}")
    return name


@contextlib.contextmanager
def cudnn_export(cudnn_version: int = 90800) -> Iterator[None]:
    """Trace the cudnn implementation on a host without a GPU, for `jax.export(..., platforms=['cuda'])`.

    Why: jax calls `check_cudnn_version()` while tracing cuDNN attention and
    raises "cuDNN is not detected" on a CPU-only jaxlib, although the exported
    custom call (`__cudnn$fmha*`) needs no cuDNN until it runs on a GPU. Inside
    this block that check returns `cudnn_version` and `auto` resolves as on a
    CUDA GPU (pre-Hopper head-dim limit, 128). Only for exporting: a program
    traced here must not run on this host. Pass the custom-call names to
    `jax.export.DisabledSafetyCheck.custom_call` (see `CUDNN_CUSTOM_CALLS`).
    """
    global _export_platform
    from jax._src.cudnn import fused_attention_stablehlo as fa
    saved_check, saved_platform = fa.check_cudnn_version, _export_platform
    fa.check_cudnn_version = lambda: cudnn_version
    _export_platform = "gpu"
    try:
        yield
    finally:
        fa.check_cudnn_version, _export_platform = saved_check, saved_platform


# Custom-call targets the cudnn implementation lowers to (forward; backward; with the padding mask the same).
CUDNN_CUSTOM_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def _context_mesh() -> Any:
    """The mesh of a `jax.set_mesh` block (concrete, else abstract), or None.

    `jax.sharding.get_mesh` refuses to run under `jit`, so the concrete mesh is
    read from jax's device context directly.
    """
    from jax._src import mesh as mesh_lib
    mesh = mesh_lib.get_concrete_mesh()
    if mesh is not None and not mesh.empty:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def _mesh_platform(mesh: jax.sharding.Mesh) -> str | None:
    devices = getattr(mesh, "devices", None)
    if devices is not None and devices.size:
        return devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return None if device is None else device.platform


def current_platform(mesh: jax.sharding.Mesh | None = None) -> str:
    """Platform attention is traced for: export block, else the mesh's devices, else the default backend.

    Why the mesh: a CPU host compiling for TPU topology devices has
    `jax.default_backend() == 'cpu'`, but the program is for the mesh's chips.
    """
    if _export_platform is not None:
        return _export_platform
    mesh = mesh if mesh is not None else _context_mesh()
    platform = None if mesh is None else _mesh_platform(mesh)
    return _normalise_platform(platform or jax.default_backend())


def _normalise_platform(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "gpu") else platform


def _gpu_head_dim_limit() -> int:
    """cuDNN flash attention head-dim cap: 256 from Hopper (compute capability 9.0), else 128."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return 128  # exporting from a host without a GPU: the conservative limit
    cc = getattr(gpus[0], "compute_capability", "0.0")
    return 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128


def _why_not(impl: str, dtype: jax.typing.DTypeLike, head_dim: int, platform: str, dropout: bool) -> str | None:
    """Why `impl` cannot run this call (None: it can)."""
    if impl in ("cudnn", "splash") and dropout:
        return (f"{impl} has no attention dropout drawn from config.prng_impl; training with "
                f"transformer.attention_dropout_rate > 0 uses xla (set it to 0 to train with {impl})")
    if impl == "cudnn":
        if platform != "gpu":
            return f"cudnn needs a CUDA GPU (platform is {platform})"
        if jnp.dtype(dtype) not in _CUDNN_DTYPES:
            return f"cudnn needs float16/bfloat16 activations (transformer.dtype is {jnp.dtype(dtype).name})"
        limit = _gpu_head_dim_limit()
        if head_dim % 8 or head_dim > limit:
            return f"cudnn needs a head dim that is a multiple of 8 and <= {limit} (got {head_dim})"
    return None


def resolve_attention(name: str, dtype: jax.typing.DTypeLike, head_dim: int, platform: str | None = None,
                      dropout: bool = False) -> tuple[str, str]:
    """(implementation that runs, why) for `transformer.attention=name`.

    `platform` defaults to `current_platform()`; `dropout` is whether the call
    applies attention dropout (training with attention_dropout_rate > 0).
    """
    check_attention_name(name)
    platform = _normalise_platform(platform or current_platform())
    if name == "auto":
        if platform == "cpu":
            return "scan", "auto on cpu: the per-head scan kernel"
        candidate = {"gpu": "cudnn", "tpu": "splash"}.get(platform)
        if candidate is None:
            return "xla", f"auto on {platform}: no fused kernel"
        problem = _why_not(candidate, dtype, head_dim, platform, dropout)
        if problem:
            return "xla", f"auto on {platform}: {problem}"
        return candidate, f"auto on {platform}"
    problem = _why_not(name, dtype, head_dim, platform, dropout)
    if problem:
        return "xla", problem
    if name == "splash" and platform != "tpu":
        return "splash", f"splash on {platform} runs in Pallas interpret mode (an emulation for tests; slow)"
    return name, "requested"


def _log_once(requested: str, impl: str, reason: str) -> None:
    if (requested, impl, reason) in _logged:
        return
    _logged.add((requested, impl, reason))
    fell_back = requested not in ("auto", impl)
    level = logging.WARNING if fell_back or "interpret" in reason else logging.INFO
    logger.log(level, "attention: transformer.attention=%s runs %s (%s)", requested, impl, reason)


def attend(q_BxNxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, dtype: jax.typing.DTypeLike,
           keep_HxBxNxL: jax.Array | None = None, keep_prob: float = 1.0,
           implementation: str = "scan", mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Softmax attention of N queries over L keys (no mask: fully bidirectional).

    `keep_HxBxNxL` (bool, heads first so each scan step reads a contiguous
    block) is an attention-dropout mask on the probabilities; kept entries are
    divided by `keep_prob`. `implementation` is a `transformer.attention` name;
    `mesh` (default: the `jax.set_mesh` mesh) places splash's `shard_map`.
    """
    expected_HxBxNxL = (q_BxNxHxK.shape[2], q_BxNxHxK.shape[0], q_BxNxHxK.shape[1], k_BxLxHxK.shape[1])
    if keep_HxBxNxL is not None and keep_HxBxNxL.shape != expected_HxBxNxL:
        raise ValueError(f"dropout mask shape {keep_HxBxNxL.shape} is not [H, B, N, L] = {expected_HxBxNxL}")
    dtype = jnp.dtype(dtype)
    platform = current_platform(mesh)
    impl, reason = resolve_attention(implementation, dtype, q_BxNxHxK.shape[-1], platform,
                                     dropout=keep_HxBxNxL is not None)
    if implementation != "scan":
        _log_once(implementation, impl, reason)
    if impl == "xla":
        return _attend_xla(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype, keep_HxBxNxL, keep_prob)
    if impl == "cudnn":
        return _attend_cudnn(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype)
    if impl == "splash":
        mesh = mesh if mesh is not None else _context_mesh()
        if platform == "tpu" and mesh is None and jax.device_count() > 1:
            # Mosaic kernels cannot be partitioned by XLA; without a mesh there is no shard_map to run in.
            _log_once(implementation, "xla", "splash on several TPU chips needs the mesh: pass mesh= "
                      "or trace inside jax.set_mesh(mesh)")
            return _attend_xla(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype, None, keep_prob)
        return _attend_splash(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype, mesh, interpret=platform != "tpu")
    return _attend_scan(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype, keep_HxBxNxL, keep_prob)


def _attend_scan(q_BxNxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, dtype: jax.typing.DTypeLike,
                 keep_HxBxNxL: jax.Array | None, keep_prob: float) -> jax.Array:
    """Today's CPU kernel: per-head lax.scan with the flash-style custom VJP."""
    scale = jnp.asarray(1.0 / np.sqrt(q_BxNxHxK.shape[-1]), q_BxNxHxK.dtype)
    q_HxBxNxK, k_HxBxLxK, v_HxBxLxK = (
        jnp.moveaxis(t, 2, 0) for t in (q_BxNxHxK * scale, k_BxLxHxK, v_BxLxHxK))
    out_HxBxNxK = _attend_heads(jnp.dtype(dtype), float(keep_prob),
                                q_HxBxNxK, k_HxBxLxK, v_HxBxLxK, keep_HxBxNxL)
    return jnp.moveaxis(out_HxBxNxK, 0, 2)


def _attend_xla(q_BxNxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, dtype: jax.typing.DTypeLike,
                keep_HxBxNxL: jax.Array | None, keep_prob: float) -> jax.Array:
    """jax.nn.dot_product_attention on XLA; with dropout the same one-shot softmax, masked."""
    if keep_HxBxNxL is None:
        return jax.nn.dot_product_attention(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, implementation="xla").astype(dtype)
    scale = 1.0 / np.sqrt(q_BxNxHxK.shape[-1])
    logits = jnp.einsum("bnhk,blhk->bhnl", q_BxNxHxK, k_BxLxHxK, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1)
    probs = apply_keep(probs, jnp.moveaxis(keep_HxBxNxL, 0, 1), keep_prob).astype(v_BxLxHxK.dtype)
    out = jnp.einsum("bhnl,blhk->bnhk", probs, v_BxLxHxK, preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _pad_axis1(x: jax.Array, size: int) -> jax.Array:
    return x if x.shape[1] == size else jnp.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _attend_cudnn(q_BxNxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                  dtype: jax.typing.DTypeLike) -> jax.Array:
    """cuDNN flash attention; odd lengths are padded to even under cuDNN's padding mask.

    Why pad: jax's cuDNN backward rule rejects odd query or key lengths
    (L = 257 here) because it counts an absent bias as present.
    """
    batch, queries = q_BxNxHxK.shape[:2]
    keys = k_BxLxHxK.shape[1]
    if queries % 2 == 0 and keys % 2 == 0:
        out = jax.nn.dot_product_attention(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, implementation="cudnn")
        return out.astype(dtype)
    q = _pad_axis1(q_BxNxHxK, queries + queries % 2)
    k, v = (_pad_axis1(t, keys + keys % 2) for t in (k_BxLxHxK, v_BxLxHxK))
    out = jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn",
        query_seq_lengths=jnp.full((batch,), queries, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), keys, jnp.int32))
    return out[:, :queries].astype(dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_block(length: int) -> int:
    """Largest of 512/256/128 dividing a padded length (bigger blocks: fewer grid steps on TPU)."""
    return next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool) -> Any:
    """A splash kernel for [heads, q_len, K] x [heads, kv_len, K] (padded lengths), full mask."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
    # Concrete mask-info arrays even when first built inside a trace, so the cached kernel holds no tracer.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                  interpret=interpret)


# Mesh axes splash's shard_map splits batch and heads over: maskgen.sharding's rules for the logical
# batch and heads axes (models do not import the sharding module; a test checks the two agree).
SPLASH_BATCH_AXES = ("data", "fsdp")
SPLASH_HEAD_AXES = ("tensor",)


def _split(mesh_shape: dict, candidates: tuple, size: int) -> Any:
    """The present (size > 1) axes of `candidates` if together they divide `size`, as the rules do."""
    group = tuple(a for a in candidates if mesh_shape.get(a, 1) > 1)
    if not group or size % math.prod(mesh_shape[a] for a in group):
        return None
    return group[0] if len(group) == 1 else group


def splash_spec(mesh: jax.sharding.Mesh, batch: int, heads: int) -> jax.sharding.PartitionSpec:
    """shard_map PartitionSpec of [B, H, N, K] blocks: batch over data/fsdp, heads over tensor."""
    shape = dict(mesh.shape)
    return jax.sharding.PartitionSpec(_split(shape, SPLASH_BATCH_AXES, batch),
                                      _split(shape, SPLASH_HEAD_AXES, heads), None, None)


def _attend_splash(q_BxNxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, dtype: jax.typing.DTypeLike,
                   mesh: jax.sharding.Mesh | None, interpret: bool) -> jax.Array:
    """Splash attention: pad to multiples of 128, pad keys in segment 1, shard_map over the mesh.

    Pad queries stay in segment 0 (they see the real keys), so no row of the
    mask is empty; their outputs are sliced off. Splash takes one example
    [heads, seq, head_dim] and no scale, hence the vmap and the scaled q.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    batch, queries, heads, head_dim = q_BxNxHxK.shape
    keys = k_BxLxHxK.shape[1]
    q_len, kv_len = _round_up(queries, SPLASH_BLOCK), _round_up(keys, SPLASH_BLOCK)
    scale = jnp.asarray(1.0 / math.sqrt(head_dim), q_BxNxHxK.dtype)
    q = jnp.swapaxes(_pad_axis1(q_BxNxHxK * scale, q_len), 1, 2)
    k, v = (jnp.swapaxes(_pad_axis1(t, kv_len), 1, 2) for t in (k_BxLxHxK, v_BxLxHxK))
    segments = SegmentIds(q=jnp.zeros((q_len,), jnp.int32),
                          kv=(jnp.arange(kv_len) >= keys).astype(jnp.int32))

    def local(q_BxHxNxK: jax.Array, k_BxHxLxK: jax.Array, v_BxHxLxK: jax.Array) -> jax.Array:
        kernel = _splash_kernel(q_BxHxNxK.shape[1], q_len, kv_len, interpret)
        return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_BxHxNxK, k_BxHxLxK, v_BxHxLxK, segments)

    if mesh is not None and mesh.size > 1:
        # Mosaic kernels cannot be partitioned automatically: each device runs its own block.
        spec = splash_spec(mesh, batch, heads)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    out_BxHxNxK = local(q, k, v)
    return jnp.swapaxes(out_BxHxNxK[:, :, :queries], 1, 2).astype(dtype)


def _head_forward(dtype: jax.typing.DTypeLike, keep_prob: float, q_BxNxK: jax.Array, k_BxLxK: jax.Array,
                  v_BxLxK: jax.Array, keep_BxNxL: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One head: (output [B, N, K] in `dtype`, log-sum-exp [B, N, 1] in float32)."""
    logits = jnp.einsum("bnk,blk->bnl", q_BxNxK, k_BxLxK).astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    weights = apply_keep(unnormalised, keep_BxNxL, keep_prob).astype(dtype)
    out = jnp.einsum("bnl,blk->bnk", weights, v_BxLxK).astype(jnp.float32) / total
    return out.astype(dtype), top + jnp.log(total)


def _scan_heads(dtype: jax.typing.DTypeLike, keep_prob: float, q: jax.Array, k: jax.Array, v: jax.Array,
                keep: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    def body(_: Any, head: tuple) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return None, _head_forward(dtype, keep_prob, *head)
    xs = (q, k, v, keep)
    return lax.scan(body, None, xs)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend_heads(dtype: jax.typing.DTypeLike, keep_prob: float, q_HxBxNxK: jax.Array, k_HxBxLxK: jax.Array,
                  v_HxBxLxK: jax.Array, keep_HxBxNxL: jax.Array | None) -> jax.Array:
    return _scan_heads(dtype, keep_prob, q_HxBxNxK, k_HxBxLxK, v_HxBxLxK, keep_HxBxNxL)[0]


def _attend_heads_fwd(dtype: jax.typing.DTypeLike, keep_prob: float, q: jax.Array, k: jax.Array,
                      v: jax.Array,
                      keep: jax.Array | None) -> tuple[jax.Array, tuple]:
    out, lse = _scan_heads(dtype, keep_prob, q, k, v, keep)
    return out, (q, k, v, keep, out, lse)


def _attend_heads_bwd(dtype: jax.typing.DTypeLike, keep_prob: float, residuals: tuple,
                      g_HxBxNxK: jax.Array) -> tuple:
    q, k, v, keep, out, lse = residuals
    # sum_l dP * P per query equals sum_k dOut * Out (Out is P @ V).
    delta_HxBxNx1 = jnp.sum(g_HxBxNxK.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)

    def one_head(_: Any, head: tuple) -> tuple[None, tuple[jax.Array, jax.Array, jax.Array]]:
        q_BxNxK, k_BxLxK, v_BxLxK, keep_BxNxL, lse_BxNx1, g_BxNxK, delta_BxNx1 = head
        logits = jnp.einsum("bnk,blk->bnl", q_BxNxK, k_BxLxK).astype(jnp.float32)
        probs = jnp.exp(logits - lse_BxNx1)
        dv = jnp.einsum("bnl,bnk->blk", apply_keep(probs, keep_BxNxL, keep_prob).astype(dtype), g_BxNxK)
        d_probs = apply_keep(jnp.einsum("bnk,blk->bnl", g_BxNxK, v_BxLxK).astype(jnp.float32),
                           keep_BxNxL, keep_prob)
        d_logits = (probs * (d_probs - delta_BxNx1)).astype(dtype)
        dq = jnp.einsum("bnl,blk->bnk", d_logits, k_BxLxK)
        dk = jnp.einsum("bnl,bnk->blk", d_logits, q_BxNxK)
        return None, (dq, dk, dv)

    _, (dq, dk, dv) = lax.scan(one_head, None, (q, k, v, keep, lse, g_HxBxNxK, delta_HxBxNx1))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend_heads.defvjp(_attend_heads_fwd, _attend_heads_bwd)
