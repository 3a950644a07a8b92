"""Attention implementations (transformer.attention) against a float64 reference, forward and gradients;
the transformer's three entry points per implementation; splash under shard_map; cuDNN exported for CUDA
from this CPU host; auto / fallback resolution."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.models import attention as attn
from maskgen.models.attention import attend, resolve_attention
from maskgen.models.transformer import Transformer

CPU_IMPLS = ("scan", "xla", "splash")  # splash runs in Pallas interpret mode here
TOL = {jnp.float32: {"fwd": 1e-6, "grad": 1e-5}, jnp.bfloat16: {"fwd": 1e-2, "grad": 1e-2}}


def _inputs(seed, batch, queries, keys, heads, dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, queries, heads, dim))
    k, v = (rng.normal(size=(batch, keys, heads, dim)) for _ in range(2))
    g = rng.normal(size=q.shape)
    return q, k, v, g


def _reference64(q, k, v, g, keep_HxBxNxL=None, keep_prob=1.0):
    """Softmax attention and the gradients of sum(out * g), in float64 numpy (closed form)."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = np.einsum("bnhk,blhk->bhnl", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = 1.0 if keep_HxBxNxL is None else np.moveaxis(keep_HxBxNxL, 0, 1) / keep_prob
    out = np.einsum("bhnl,blhk->bnhk", p * m, v)
    dv = np.einsum("bhnl,bnhk->blhk", p * m, g)
    dp = np.einsum("bnhk,blhk->bhnl", g, v) * m
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq = np.einsum("bhnl,blhk->bnhk", ds, k) * scale
    dk = np.einsum("bhnl,bnhk->blhk", ds, q) * scale
    return out, (dq, dk, dv)


def _run(impl, dtype, q, k, v, g, keep=None, keep_prob=1.0):
    args = [jnp.asarray(t, dtype) for t in (q, k, v)]
    cot = jnp.asarray(g, jnp.float32)

    def loss(q, k, v):
        out = attend(q, k, v, dtype, keep, keep_prob, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(*args)
    return out, grads


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("queries", [257, 13], ids=["L=257", "N<L"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_forward_and_gradients_equal_float64_reference(impl, queries, dtype):
    """L = 257 is not a multiple of splash's 128 (padding); N < L is ReCAP's subset forward."""
    q, k, v, g = _inputs(0, 2, queries, 257, 2, 16)
    if dtype == jnp.bfloat16:  # compare against the reference of the rounded inputs
        q, k, v = (np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64) for t in (q, k, v))
    want, want_grads = _reference64(q, k, v, g)
    out, grads = _run(impl, dtype, q, k, v, g)
    assert out.shape == q.shape and out.dtype == dtype
    assert _rel(out, want) < TOL[dtype]["fwd"]
    for name, got, ref in zip("qkv", grads, want_grads):
        assert got.dtype == dtype, name
        assert _rel(got, ref) < TOL[dtype]["grad"], name


@pytest.mark.parametrize("impl", ["scan", "xla", "splash", "cudnn"])
def test_attention_dropout_is_applied_by_every_implementation(impl):
    """With a dropout mask, scan and xla apply it; cudnn and splash (no dropout) fall back to xla."""
    q, k, v, g = _inputs(1, 2, 9, 9, 2, 8)
    keep = np.random.default_rng(2).random((2, 2, 9, 9)) < 0.75
    want, want_grads = _reference64(q, k, v, g, keep, 0.75)
    out, grads = _run(impl, jnp.float32, q, k, v, g, jnp.asarray(keep), 0.75)
    assert _rel(out, want) < 2e-5
    for name, got, ref in zip("qkv", grads, want_grads):
        assert _rel(got, ref) < 1e-4, name
    no_dropout, _ = _reference64(q, k, v, g)
    assert _rel(out, no_dropout) > 1e-2


def test_resolve_attention_per_backend():
    bf16, fp32 = jnp.bfloat16, jnp.float32
    assert resolve_attention("auto", fp32, 64, "cpu")[0] == "scan"
    assert resolve_attention("auto", bf16, 64, "cpu", dropout=True)[0] == "scan"
    assert resolve_attention("auto", bf16, 64, "gpu") == ("cudnn", "auto on gpu")
    assert resolve_attention("auto", bf16, 64, "cuda")[0] == "cudnn"
    impl, why = resolve_attention("auto", fp32, 64, "gpu")
    assert impl == "xla" and "transformer.dtype is float32" in why
    impl, why = resolve_attention("auto", bf16, 12, "gpu")
    assert impl == "xla" and "multiple of 8" in why
    impl, why = resolve_attention("auto", bf16, 64, "gpu", dropout=True)
    assert impl == "xla" and "transformer.attention_dropout_rate" in why
    assert resolve_attention("auto", fp32, 64, "tpu")[0] == "splash"
    impl, why = resolve_attention("splash", fp32, 64, "tpu", dropout=True)
    assert impl == "xla" and "attention_dropout_rate" in why
    impl, why = resolve_attention("cudnn", bf16, 64, "cpu")
    assert impl == "xla" and "CUDA GPU" in why
    assert resolve_attention("splash", fp32, 64, "cpu")[0] == "splash"  # interpret mode
    assert resolve_attention("xla", fp32, 64, "tpu", dropout=True) == ("xla", "requested")
    assert resolve_attention("auto", fp32, 64, "rocm")[0] == "xla"
    with pytest.raises(ValueError, match=r"transformer.attention='flsh' is not one of"):
        resolve_attention("flsh", fp32, 64, "cpu")
    with pytest.raises(ValueError, match=r"transformer.attention='flsh'"):
        Transformer(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=5,
                    attention="flsh").init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


def test_fallback_is_logged_once(caplog):
    attn._logged.clear()
    q, k, v, _ = (jnp.asarray(t, jnp.float32) for t in _inputs(3, 1, 4, 4, 2, 8))
    with caplog.at_level(logging.INFO, logger="maskgen"):
        for _ in range(3):
            jax.jit(lambda q, k, v: attend(q, k, v, jnp.float32, implementation="cudnn"))(q, k + 0, v)
    lines = [r.getMessage() for r in caplog.records if "transformer.attention=cudnn" in r.getMessage()]
    assert lines == ["attention: transformer.attention=cudnn runs xla (cudnn needs a CUDA GPU (platform is cpu))"]
    assert caplog.records[0].levelno == logging.WARNING


# ----------------------------------------------------------------------------- the transformer


def _model(attention, dtype=jnp.float32, length=65, **kw):
    return Transformer(vocab_size=75, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                       max_len=length, dtype=dtype, attention=attention, **kw)


@pytest.fixture(scope="module")
def tiny():
    model = _model("scan")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 75, (2, 65)), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    return variables, ids


@pytest.mark.parametrize("impl", ["xla", "splash", "auto", "cudnn"])
def test_three_entry_points_match_the_scan_kernel(impl, tiny):
    """__call__, forward_with_kv and forward_subset (N < L over a cache) agree with `scan`."""
    variables, ids = tiny
    positions = jnp.asarray([[0, 3, 7, 64], [0, 1, 2, 40]], jnp.int32)
    sub = jnp.take_along_axis(ids, positions, axis=1)

    def run(model):
        logits = model.apply(variables, ids)
        full, kv = model.apply(variables, ids, method="forward_with_kv")
        cheap = model.apply(variables, sub, positions, kv, method="forward_subset")
        return logits, full, kv.k, cheap
    got = jax.jit(lambda: run(_model(impl)))()
    want = jax.jit(lambda: run(_model("scan")))()
    for name, a, b in zip(("logits", "forward_with_kv", "kv", "subset"), got, want):
        assert _rel(a, b) < 1e-5, name
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(jnp.take_along_axis(
        got[0], positions[..., None], axis=1)), rtol=1e-4, atol=1e-4)


def test_auto_on_cpu_is_the_scan_kernel_bit_for_bit(tiny):
    variables, ids = tiny
    rngs = {"dropout": jax.random.key(3)}

    def loss(model):
        return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, deterministic=False, rngs=rngs)))(
            variables["params"])
    a = jax.jit(lambda: loss(_model("auto")))()
    b = jax.jit(lambda: loss(_model("scan")))()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_splash_runs_under_shard_map_over_batch_and_heads():
    from maskgen import sharding as shd
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()[:8])
    q, k, v, g = _inputs(4, 4, 13, 130, 4, 8)
    want, want_grads = _reference64(q, k, v, g)
    args = [jnp.asarray(t, jnp.float32) for t in (q, k, v)]

    def loss(q, k, v):
        out = attend(q, k, v, jnp.float32, implementation="splash", mesh=mesh)
        return jnp.sum(out * jnp.asarray(g, jnp.float32)), out
    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
    assert attn.splash_spec(mesh, 4, 4) == jax.sharding.PartitionSpec("data", "tensor", None, None)
    # The same axes as maskgen.sharding's rules for the logical batch and heads axes.
    from maskgen import axes
    for shape, batch, heads in [((2, 2, 2), 4, 2), ((2, 4, 1), 8, 3), ((2, 4, 1), 2, 4), ((1, 2, 4), 6, 8)]:
        m = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), jax.devices()[:8])
        rule = shd.resolve_spec((axes.BATCH, axes.HEADS), (batch, heads), m)
        assert tuple(attn.splash_spec(m, batch, heads))[:2] == tuple(rule), (shape, batch, heads)
    (_, out), grads = fn(*args)
    assert _rel(out, want) < 2e-5
    for name, got, ref in zip("qkv", grads, want_grads):
        assert _rel(got, ref) < 1e-4, name
    # The same through the mesh of a jax.set_mesh block (how a trainer or bench/compile.py binds it).
    with jax.set_mesh(mesh):
        out2 = jax.jit(lambda q, k, v: attend(q, k, v, jnp.float32, implementation="splash"))(*args)
        assert "shard_map" in str(jax.make_jaxpr(
            lambda q, k, v: attend(q, k, v, jnp.float32, implementation="splash"))(*args))
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_cudnn_transformer_exports_for_cuda_from_a_cpu_host(tiny):
    """Forward and train-step gradient with attention=cudnn, bf16, lower to cuDNN's fused attention."""
    variables, ids = tiny
    model = _model("cudnn", jnp.bfloat16)

    def forward(params, ids):
        return model.apply({"params": params}, ids)

    def grads(params, ids):
        return jax.grad(lambda p: jnp.sum(forward(p, ids)))(params)
    checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in attn.CUDNN_CUSTOM_CALLS]
    with attn.cudnn_export():
        assert resolve_attention("auto", jnp.bfloat16, 16)[0] == "cudnn"
        texts = [jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
            variables["params"], ids).mlir_module() for f in (forward, grads)]
    calls = [set(re.findall(r"custom_call @([\w$.]+)", t)) for t in texts]
    assert "__cudnn$fmhaSoftmax" in calls[0]
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls[1]
    # Outside the block the check is back: on this CPU host cudnn falls back to xla.
    assert resolve_attention("cudnn", jnp.bfloat16, 16)[0] == "xla"
    from jax._src.cudnn import fused_attention_stablehlo as fa
    with pytest.raises(RuntimeError, match="cuDNN"):
        fa.check_cudnn_version()
