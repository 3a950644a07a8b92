"""bench/decode.py: row format and accounting on a tiny config (1 repeat), probes, flags, quality mode."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from editing_bundle import save_small_checkpoint

from maskgen import flops, scheduler

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("decode")
plot_decode = _load("plot_decode")

REQUIRED = ("config", "batch", "steps", "method", "full_evals", "cheap_evals", "images_per_s",
            "flops_per_image", "quality", "model_s", "matmul_flops_per_s", "mfu", "loop_overhead",
            "recap_full_only_steps", "recap_cheap_per_full", "device", "date")


def _args(argv):
    args = bench.parser().parse_args(argv)
    bench.check_args(args)
    return args


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "decode-debug.json"
    rows = bench.run(_args(["--config=debug", "--batch=2", "--steps=4", "--repeats=1",
                            "--recap_cheap_per_full=1", f"--out={out}"]), log=lambda *_: None)
    return rows, out


def test_rows_have_the_interface_keys_and_are_written(debug_run):
    rows, out = debug_run
    assert [(r["mode"], r["method"]) for r in rows] == [
        ("plain", "plain"), ("recap", "recap"), ("matched", "plain")]
    for row in rows:
        assert set(REQUIRED) <= set(row), set(REQUIRED) - set(row)
        assert row["quality"] is None and row["config"] == "debug" and row["batch"] == 2
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))


def test_evaluation_counts_follow_the_recap_plan(debug_run):
    plain, recap, matched = debug_run[0]
    # debug: 4x4 tokens; T=4, K=1, P=0 -> groups (0, 1), (2, 3): 2 full + 2 cheap evaluations.
    plan = scheduler.recap_plan(4, 0, 1, schedule="cosine", num_unknown=16, length=17)
    assert (recap["full_evals"], recap["cheap_evals"]) == (plan.num_full, plan.num_cheap) == (2, 2)
    assert (plain["full_evals"], plain["cheap_evals"]) == (4, 0)
    assert (matched["steps"], matched["full_evals"], matched["cheap_evals"]) == (2, 2, 0)
    assert matched["matched_steps"] == 4 and matched["matched_recap_cheap_per_full"] == 1
    assert recap["recap_cheap_per_full"] == 1 and plain["recap_cheap_per_full"] == 0
    assert recap["cheap_rows"] == [r for r in plan.cheap_rows if r]


def test_flops_per_image_is_the_analytic_sum(debug_run):
    plain, recap, matched = debug_run[0]
    plan = scheduler.recap_plan(4, 0, 1, schedule="cosine", num_unknown=16, length=17)
    # debug transformer: 2 layers, width 32, MLP 64, L = 17, codebook logits only (32).
    full = flops.transformer_flops(2, 32, 64, 17, 32)
    cheap = sum(flops.transformer_flops(2, 32, 64, 17, 32, rows=r) for r in plan.cheap_rows if r)
    assert plain["flops_per_image"] == pytest.approx(4 * full, rel=1e-12)
    assert matched["flops_per_image"] == pytest.approx(2 * full, rel=1e-12)
    assert recap["flops_per_image"] == pytest.approx(2 * full + cheap, rel=1e-12)
    assert cheap < 2 * full


def test_derived_figures_are_consistent(debug_run):
    rows = debug_run[0]
    for row in rows:
        assert row["images_per_s"] > 0 and row["matmul_flops_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["decode_s"])
        assert row["mfu"] == pytest.approx(
            row["images_per_s"] * row["flops_per_image"] / row["matmul_flops_per_s"])
        assert row["loop_overhead"] == pytest.approx(1 - row["model_s"] / row["decode_s"])
        full_part = row["full_evals"] * row["full_eval_s"]
        # Cheap calls are charged at the probe time of their padded row count.
        assert sum(row["cheap_calls"].values()) == row["cheap_evals"]
        assert set(row["cheap_calls"]) == set(row["cheap_eval_s"])
        cheap_part = sum(calls * row["cheap_eval_s"][rows] for rows, calls in row["cheap_calls"].items())
        assert row["model_s"] == pytest.approx(full_part + cheap_part)
        assert 0 < row["model_s"]
        assert row["images_per_cpu_s"] == pytest.approx(row["batch"] / row["decode_cpu_s"])
        assert row["mfu_cpu"] == pytest.approx(
            row["images_per_cpu_s"] * row["flops_per_image"] / row["matmul_flops_per_cpu_s"])
        assert row["loop_overhead_cpu"] == pytest.approx(1 - row["model_cpu_s"] / row["decode_cpu_s"])
    plain, recap, _ = rows
    assert recap["speedup_vs_plain"] == pytest.approx(plain["decode_s"] / recap["decode_s"])
    assert recap["speedup_bound"] == pytest.approx(plain["model_s"] / recap["model_s"])
    assert recap["speedup_vs_plain_cpu"] == pytest.approx(plain["decode_cpu_s"] / recap["decode_cpu_s"])
    table = plot_decode.markdown_table(rows)
    assert table.count("\n") == 1 + len(rows) and "| debug | 2 | 4 | recap |" in table


def test_probe_runs_exactly_count_chained_evaluations():
    def fn(params, ids):
        return (ids.astype(jnp.float32) * params)[:, :, None]  # logits [B, L, 1]
    ids = jnp.asarray([[3, 1], [2, 5]], jnp.int32)
    for count in (2, 3):
        got = float(bench.eval_probe(fn, count)(jnp.float32(0.5), ids))
        assert got == count * 5.5  # each evaluation adds sum(logits) = (3 + 1 + 2 + 5) * 0.5
    np.testing.assert_array_equal(bench.eval_probe(fn, 1)(jnp.float32(0.5), ids), fn(0.5, ids))


@pytest.mark.parametrize("argv, flag", [
    (["--config=debug", "--methods=plain,fast"], "--methods"),
    (["--config=debug", "--recap_cheap_per_full=0"], "--recap_cheap_per_full"),
    (["--config=debug", "--steps=8,x"], "--steps"),
    (["--config=debug", "--recap_full_only_steps=-1"], "--recap_full_only_steps"),
    (["--config=debug", "--checkpoint=/tmp"], "exactly one"),
    (["--config=debug", "--quality"], "--quality needs --checkpoint"),
    (["--checkpoint=/tmp", "--set", "image_size=32"], "--set changes a --config"),
])
def test_bad_flags_name_the_problem(argv, flag):
    with pytest.raises(ValueError, match=flag):
        _args(argv)
    with pytest.raises(ValueError, match="unknown config"):
        bench.load_config("no_such_config")


def test_quality_mode_scores_decoded_images_and_plots(tmp_path):
    workdir = save_small_checkpoint(tmp_path / "run")
    seen = []

    def quality(images, labels):
        seen.append((images.shape, images.dtype, labels.tolist()))
        return {"class_accuracy": float(np.mean(images) / 255.0), "frechet": float(len(seen))}

    args = _args([f"--checkpoint={workdir}", "--batch=2", "--steps=2", "--repeats=1",
                  "--methods=plain,recap", "--recap_cheap_per_full=1", "--quality",
                  "--quality_samples=3", f"--plot={tmp_path / 'q.png'}", f"--out={tmp_path / 'q.json'}"])
    args.quality_fn = quality
    rows = bench.run(args, log=lambda *_: None)
    assert [r["method"] for r in rows] == ["plain", "recap"]
    # One decode of 3 Fashion-sized images per setting, labels 0, 1, 2.
    assert seen == [((3, 28, 28, 1), np.uint8, [0, 1, 2])] * 2
    assert [r["quality"]["frechet"] for r in rows] == [1.0, 2.0]
    assert all(r["quality_samples"] == 3 for r in rows)
    png = (tmp_path / "q.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert jax.tree.leaves(json.loads((tmp_path / "q.json").read_text())[1]["quality"])


def test_set_overrides_parse_as_the_replaced_type():
    cfg = bench.apply_overrides(bench.load_config("debug"),
                                ["transformer.hidden_size=64", "image_size=32", "sampling.schedule=linear"])
    assert (cfg.transformer.hidden_size, cfg.image_size, cfg.sampling.schedule) == (64, 32, "linear")
    assert bench.seq_len(cfg) == 1 + 8 * 8  # debug tokenizer downsamples 4x
    with pytest.raises(ValueError, match="no key 'transformer.width'"):
        bench.apply_overrides(bench.load_config("debug"), ["transformer.width=3"])
    with pytest.raises(ValueError, match="not a int"):
        bench.apply_overrides(bench.load_config("debug"), ["image_size=big"])
