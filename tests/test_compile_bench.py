"""bench/compile.py: TPU programs compiled on this CPU host (libtpu), GPU programs exported for CUDA."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import compile as compile_bench  # noqa: E402

ROW_KEYS = {"config", "topology", "platform", "program", "attention", "remat", "global_batch", "mesh",
            "per_chip_bytes", "hbm_bytes", "fits", "flops"}
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _run_bench(tmp_path, *args, timeout=300):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "compile.py"), *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); "
                                           "the TPU compiler is what this test exercises")
def test_debug_config_compiles_for_a_v5e_2x2(tmp_path):
    rows = _run_bench(tmp_path, "--config=debug", "--topology=v5e:2x2")
    assert [r["program"] for r in rows] == list(compile_bench.PROGRAMS)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert (r["config"], r["topology"], r["platform"]) == ("debug", "v5e:2x2", "tpu")
        assert r["device_kind"] == "TPU v5 lite" and r["chips"] == 4
        assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
        assert r["global_batch"] == 8 and r["hbm_bytes"] == 16 * 2**30 and r["fits"] is True
        mem = r["per_chip_bytes"]
        assert set(mem) == {"arguments", "outputs", "temp", "total"}
        assert mem["total"] == (mem["arguments"] + mem["outputs"] - r["alias_bytes"] + mem["temp"]
                                + r["code_bytes"])
        assert r["flops"] > 0 and r["flops"] == pytest.approx(4 * r["flops_per_chip"])
        assert r["attention"] and r["remat"] and r["dtype"] == "bfloat16"
    by_name = {r["program"]: r for r in rows}
    # The replicated train state (params, EMA, two Adam moments; fp32) is in every chip's arguments
    # and is donated: the outputs reuse its buffers.
    train = by_name["transformer_train_step"]
    cfg = compile_bench.load_config("debug", [])
    from maskgen.models import factory
    from maskgen.models.sizes import seq_len
    model = factory.transformer_model(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len(cfg)), jnp.int32))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert 16 * num_params <= train["per_chip_bytes"]["arguments"] < 16 * num_params + 2**20
    assert train["alias_bytes"] >= 16 * num_params
    # Live activation constraints in the sharded programs (the tokenizer has no marks).
    assert train["sharding_constraints"] > 0 and by_name["decode_recap"]["sharding_constraints"] > 0
    assert by_name["decode_recap"]["recap_cheap_per_full"] == 2
    # ReCAP's cheap steps are extra work on top of the same full evaluations.
    assert by_name["decode_recap"]["flops"] > by_name["decode"]["flops"]


def test_cuda_export_lists_custom_calls_and_takes_overrides(tmp_path):
    rows = _run_bench(tmp_path, "--config=debug", "--platform=cuda", "--config.mesh.fsdp=2",
                      "--programs=transformer_train_step,decode", "--batch=16", timeout=240)
    assert [r["program"] for r in rows] == ["transformer_train_step", "decode"]
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["platform"] == "cuda" and r["compiled"] is False and r["topology"] is None
        assert r["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and r["global_batch"] == 16
        assert isinstance(r["custom_calls"], list) and r["custom_calls"] == sorted(r["custom_calls"])
        assert r["sharding_constraints"] > 0
        if r["attention"] == "cudnn":
            assert any(name.startswith("__cudnn$fmha") for name in r["custom_calls"])


def test_custom_call_lister_finds_cudnn_attention(monkeypatch):
    """A real cuDNN attention exported for CUDA (its trace-time cuDNN check bypassed: no GPU here)."""
    from jax._src.cudnn import fused_attention_stablehlo
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda *a, **k: None)

    def loss(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32).sum()
    x = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
    program = compile_bench.Program("attention", jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, x, x), 2)
    row = compile_bench.export_cuda(program)
    assert row["custom_calls"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    text = 'stablehlo.custom_call @foo(%0) {call_target_name = "bar"}\n%1 = stablehlo.custom_call @"x$y"(%2)'
    assert compile_bench.custom_call_targets(text) == ["bar", "foo", "x$y"]


def test_bad_names_fail_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v9x:2x2'.*v5e:16x16"):
        compile_bench.parse_topology("v9x:2x2")
    with pytest.raises(ValueError, match="unknown TPU topology"):
        compile_bench.parse_topology("v5e-8")
    assert compile_bench.parse_topology("v4:8x8x4") == ("v4", 256)
    with pytest.raises(ValueError, match="unknown program 'train'.*decode_recap"):
        compile_bench.parse_programs("decode,train")
    assert compile_bench.parse_programs("") == compile_bench.PROGRAMS
    with pytest.raises(ValueError, match="cannot apply overrides"):
        compile_bench.load_config("debug", ["--config.transformer.no_such_key=1"])
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        compile_bench.load_config("nope", [])
    cfg = compile_bench.load_config("configs/debug.py", ["--config.mesh.tensor=2", "--config.null_class=False"])
    assert cfg.mesh.tensor == 2 and cfg.null_class is False


def test_oom_messages_become_per_chip_bytes():
    program = compile_bench.Program("p", None, (jax.ShapeDtypeStruct((8, 1024), jnp.float32),), 8)
    report = compile_bench.oom_report(
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (27.21G) exceeds available HBM (15.75G).", program)
    gib = 2**30
    assert report["per_chip_bytes"]["temp"] == int(27.21 * gib)
    assert report["per_chip_bytes"]["arguments"] == 8 * 1024 * 4
    assert report["per_chip_bytes"]["total"] == 8 * 1024 * 4 + int(27.21 * gib)
    assert report["compiler_hbm_limit_bytes"] == int(15.75 * gib)
    report = compile_bench.oom_report("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
                                      "Used 20.50G of 15.75G hbm.", program)
    assert report["per_chip_bytes"]["total"] == int(20.5 * gib)
