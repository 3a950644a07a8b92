"""Training: the transformer loss pieces, stage configs, and train.py runs (end to end, killed, resumed)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskgen import config_io
from maskgen.scheduler import schedules
from maskgen.tokens import TokenLayout
from maskgen.training import iterators, trainer
from maskgen.training import transformer_step as tst

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


def _debug_cfg(**overrides):
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_stage_config_inherits_top_level_values_unless_set():
    cfg = _debug_cfg(num_train_steps=7, checkpoint_every_steps=3)
    cfg.tokenizer_train.num_train_steps = 11
    tok, tra = trainer.stage_config(cfg, "tokenizer"), trainer.stage_config(cfg, "transformer")
    assert (tok.num_train_steps, tok.checkpoint_every_steps, tok.batch_size) == (11, 3, 8)
    assert (tra.num_train_steps, tra.checkpoint_every_steps) == (7, 3)
    assert tra.label_smoothing == cfg.transformer_train.label_smoothing
    with pytest.raises(ValueError, match="unknown stage"):
        trainer.stage_config(cfg, "discriminator")
    cfg.checkpoint_every_steps = 0
    with pytest.raises(ValueError, match="checkpoint_every_steps must be a positive int"):
        trainer.stage_config(cfg, "transformer")


def test_mask_tokens_masks_the_scheduled_count():
    n, batch, rate = 64, 256, 0.5
    tokens = jnp.arange(batch * n, dtype=jnp.int32).reshape(batch, n) % 32
    key = jax.random.key(0)
    inputs, masked = tst.mask_tokens(key, tokens, "cosine", rate, mask_id=99)
    # Recompute the per-example counts from the same draw.
    r = jax.random.uniform(jax.random.split(key)[0], (batch,))
    ratio = np.maximum(np.cos(np.pi / 2 * np.asarray(r)), rate)
    expect = np.clip(np.ceil(ratio * n), 1, n)
    np.testing.assert_array_equal(np.asarray(masked).sum(1), expect)
    np.testing.assert_array_equal(np.asarray(inputs), np.where(masked, 99, tokens))
    assert np.asarray(masked).sum(1).min() >= rate * n  # min_masking_rate respected
    # Positions are uniform: every position is masked about equally often.
    freq = np.asarray(masked).mean(0)
    assert freq.std() < 0.1
    assert np.allclose(schedules.mask_ratio("cosine", np.float32(0.0)), 1.0)


def test_masked_token_loss_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = rng.random((2, 5)) < 0.5
    eps = 0.1
    got = float(tst.masked_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), eps))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    smooth = np.full((2, 5, 7), eps / 7) + (1 - eps) * np.eye(7)[targets]
    per = -(smooth * logp).sum(-1)
    np.testing.assert_allclose(got, (per * weights).sum() / weights.sum(), rtol=1e-5)


def test_label_dropout_needs_a_null_class():
    cfg = _debug_cfg()
    layout = TokenLayout(codebook_size=32, num_classes=4, null_class_id=None)
    with pytest.raises(ValueError, match="needs a null class"):
        tst.check_train_config(cfg.transformer_train, layout)
    labels = jnp.arange(1000) % 4
    dropped = tst.drop_labels(jax.random.key(0), labels, 0.25, 4)
    frac = float(jnp.mean(dropped == 4))
    assert 0.2 < frac < 0.3 and bool(jnp.all((dropped == labels) | (dropped == 4)))


def test_epoch_sampler_splits_batches_over_processes_and_resumes():
    whole = iterators.EpochSampler(10, 4, seed=3, process_index=0, process_count=1)
    parts = [iterators.EpochSampler(10, 4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(7):  # crosses epoch boundaries
        full = whole.indices(whole.next_positions())
        split = np.concatenate([s.indices(s.next_positions()) for s in parts])
        np.testing.assert_array_equal(full, split)
    first_epoch = whole.indices(np.arange(10))
    assert sorted(first_epoch) == list(range(10))
    resumed = iterators.EpochSampler(10, 4, seed=3, process_index=0, process_count=1)
    resumed.set_state(whole.get_state())
    np.testing.assert_array_equal(resumed.indices(resumed.next_positions()),
                                  whole.indices(whole.next_positions()))
    with pytest.raises(ValueError, match="another data config"):
        iterators.EpochSampler(12, 4, seed=3).set_state(whole.get_state())


def _env():
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=REPO)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return env


def _train_cmd(workdir, *overrides):
    return [sys.executable, os.path.join(REPO, "train.py"),
            "--config=" + os.path.join(REPO, "configs/debug.py"),
            f"--workdir={workdir}", *overrides]


def _final_tree(stage_dir, step):
    return ocp.CheckpointManager(stage_dir).restore(step)["state"]


def test_two_stage_debug_run_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")  # FSDP over 2 devices
    result = subprocess.run(
        _train_cmd(workdir, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.sample_every_steps=4",
                   "--config.seed=3", "--config.prng_impl=rbg", "--config.transformer.attention=xla"),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = config_io.read_config(workdir)
    assert cfg.seed == 3 and cfg.mesh.fsdp == 2 and cfg.stages == ("tokenizer", "transformer")
    for stage in ("tokenizer", "transformer"):
        steps = sorted(int(p) for p in os.listdir(workdir / stage) if p.isdigit())
        assert steps == [2, 4], steps
        tree = _final_tree(workdir / stage, 4)
        assert int(tree["step"]) == 4
        leaves = zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(tree["ema_params"]))
        assert any(not np.array_equal(p, e) for p, e in leaves)  # the EMA lags the parameters
        assert glob.glob(str(workdir / stage / "tb" / "events.out.tfevents.*"))
        assert os.path.getsize(workdir / stage / "samples" / "step_00000004.png") > 0
    tok = _final_tree(workdir / "tokenizer", 4)
    assert {"disc_params", "disc_opt_state", "lecam_ema"} <= set(tok)
    data = ocp.CheckpointManager(workdir / "transformer").restore(4)["data"]
    assert data["process_count"] == 1
    assert data["per_process"][0]["kind"] == "sampler" and data["per_process"][0]["position"] == 4
    with np.load(glob.glob(str(workdir / "token_cache" / "*.npz"))[0]) as cache:
        assert cache["tokens"].shape == (256, 16) and cache["tokens"].dtype == np.int32
        assert cache["tokens"].max() < cfg.tokenizer.codebook_size
        assert json.loads(str(cache["meta"]))["tokenizer_step"] == 4
    assert "transformer step 4" in result.stderr
    # The attention kernel, remat and PRNG are printed at start-up and kept beside the checkpoints.
    assert "attention: transformer.attention=xla trains with xla" in result.stderr
    with open(workdir / "accelerator.json") as f:
        accel = json.load(f)
    assert (accel["attention_train"], accel["attention_decode"], accel["prng_impl"]) == ("xla", "xla", "rbg")
    assert "accelerator.json" in result.stdout and "prng rbg" in result.stdout


def _wait_for(path, proc, timeout=300):
    start = time.time()
    while not os.path.isdir(path):
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-3000:])
        if time.time() - start > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.005)


def _interrupted(cmd, env, path, sig):
    """Runs `cmd` until `path` exists, then sends `sig`; returns (returncode, stderr)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(path, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Two devices (data=2), optimised XLA, compiled once into a shared persistent cache."""
    steps, every = 16, 4
    env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_DISABLE_MOST_OPTIMIZATIONS="0", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
    cli = ["--config.stages=('transformer',)", f"--config.num_train_steps={steps}",
           f"--config.checkpoint_every_steps={every}", "--config.log_every_steps=100",
           "--config.dataset.name=synthetic_tokens", "--config.transformer.num_layers=1"]
    reference = subprocess.run(_train_cmd(tmp_path / "reference", *cli), env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = _final_tree(tmp_path / "reference" / "transformer", steps)

    workdir = tmp_path / "run"
    stage_dir = workdir / "transformer"
    cmd = _train_cmd(workdir, *cli)

    def saved_steps():
        return sorted(ocp.CheckpointManager(stage_dir).all_steps())

    # 1) Preemption: SIGTERM once the first checkpoint exists -> a save at the current step, exit 75
    #    ("preempted, rerun to resume", README: Exit codes and failures).
    code, err = _interrupted(cmd, env, str(stage_dir / str(every)), signal.SIGTERM)
    assert code == 75, err[-3000:]
    stopped_at = saved_steps()[-1]
    assert every <= stopped_at < steps, (stopped_at, err[-2000:])
    assert f"stopped during stage transformer at step {stopped_at}" in err

    # 2) Hard kill: rerun the command and SIGKILL it after it saved a later checkpoint.
    later = (stopped_at // every + 1) * every
    code, err = _interrupted(cmd, env, str(stage_dir / str(later)), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert f"resumed from step {stopped_at}" in err
    assert steps not in saved_steps(), "killed too late to test resuming"

    # 3) Rerun the same command: it resumes and reaches the uninterrupted run's state exactly.
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stderr
    got = _final_tree(stage_dir, steps)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got["step"]) == steps


def test_lr_schedule_warmup_cosine_and_decay_mask():
    from maskgen.training import optimizer
    lr = optimizer.lr_schedule(1.0, num_steps=110, warmup_steps=10, kind="cosine")
    np.testing.assert_allclose([float(lr(s)) for s in (0, 4, 9)], [0.1, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.5, atol=1e-6)  # half way through the cosine
    assert float(lr(110)) < 1e-6 and float(lr(500)) < 1e-6
    const = optimizer.lr_schedule(0.3, num_steps=5, kind="constant")
    assert float(const(0)) == pytest.approx(0.3) and float(const(100)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        optimizer.lr_schedule(1.0, 10, kind="step")
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    assert optimizer.decay_mask(params) == {"kernel": True, "bias": False}
    ema = optimizer.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.9)
    np.testing.assert_allclose(ema["w"], 0.1, rtol=1e-6)


def test_tokenizer_step_gates_the_discriminator_and_adapts_the_gan_weight():
    """LeCam + adaptive weight (the end-to-end run covers R1 + fixed weight); cond gate vs select gate."""
    from maskgen.models import factory
    from maskgen.training import optimizer, train_state
    from maskgen.training import tokenizer_step as tts
    cfg = _debug_cfg(**{"tokenizer_train.regularizer": "lecam", "tokenizer_train.lecam_weight": 0.1,
                        "tokenizer_train.adaptive_gan_weight": True, "tokenizer_train.disc_start_step": 1})
    tcfg = cfg.tokenizer_train
    vqgan, disc = factory.tokenizer_model(cfg), factory.discriminator_model(cfg)
    tx, lr = optimizer.adamw(tcfg, 10)
    disc_tx, _ = optimizer.adamw(tcfg, 10, learning_rate=tcfg.disc_learning_rate)
    step = jax.jit(tts.make_train_step(vqgan, disc, tx, disc_tx, lr, tcfg, 0.9, gate_with_cond=True))
    init = tts.make_init(vqgan, disc, tx, disc_tx, (16, 16, 3))
    state = train_state.materialize(init, jax.random.key(0), None)
    images = np.stack([iterators.synthetic_image(0, i, 4, 16, 3)[0] for i in range(4)])
    batch = {"image": jnp.asarray(images), "label": jnp.zeros((4,), jnp.int32)}
    d0 = jax.device_get(state.extra["disc_params"])
    state, m0 = step(state, batch, jax.random.key(1))
    # Step 0 < disc_start_step: the discriminator does not move and reports zeros.
    for a, b in zip(jax.tree.leaves(jax.device_get(state.extra["disc_params"])), jax.tree.leaves(d0)):
        np.testing.assert_array_equal(a, b)
    assert float(m0["disc_loss"]) == 0.0
    state, m1 = step(state, batch, jax.random.key(1))
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(jax.device_get(state.extra["disc_params"])), jax.tree.leaves(d0))]
    assert any(moved) and float(m1["disc_loss"]) > 0.0 and np.isfinite(float(m1["lecam_loss"]))
    assert float(state.extra["lecam_ema"].real) != 0.0
    weight = float(m1["gan_weight"])  # gan_weight * |g_rec| / |g_gan| at the decoder's output conv
    assert np.isfinite(weight) and weight > 0 and weight != pytest.approx(tcfg.gan_weight)
    assert int(state.step) == 2 and np.isfinite(float(m1["loss"]))
    # The select gate (the CPU default) computes the same two steps.
    select = jax.jit(tts.make_train_step(vqgan, disc, tx, disc_tx, lr, tcfg, 0.9, gate_with_cond=False))
    again = train_state.materialize(init, jax.random.key(0), None)
    again, s0 = select(again, batch, jax.random.key(1))
    assert float(s0["disc_loss"]) == 0.0
    again, s1 = select(again, batch, jax.random.key(1))
    for tree in ("extra", "params"):
        for a, b in zip(jax.tree.leaves(jax.device_get(getattr(again, tree))),
                        jax.tree.leaves(jax.device_get(getattr(state, tree)))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # fusion may round differently
    assert float(s1["disc_loss"]) == pytest.approx(float(m1["disc_loss"]), rel=1e-6)


def test_bfloat16_activations_keep_float32_parameters():
    from maskgen.models import factory
    from maskgen.models.sizes import seq_len, token_layout
    from maskgen.training import optimizer, train_state
    cfg = _debug_cfg(**{"transformer.dtype": "bfloat16", "transformer.num_layers": 1})
    layout, length = token_layout(cfg), seq_len(cfg)
    model = factory.transformer_model(cfg)
    tx, lr = optimizer.adamw(cfg.transformer_train, 10)
    step = jax.jit(tst.make_train_step(model, layout, tx, lr, cfg.transformer_train, 0.9))
    state = train_state.materialize(tst.make_init(model, tx, length), jax.random.key(0), None)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 32, (8, length - 1)), jnp.int32),
             "label": jnp.asarray(rng.integers(0, 4, (8,)), jnp.int32)}
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
