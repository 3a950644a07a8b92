"""Quantizers (vq, vq with a low-dim lookup, fsq, lfq): shapes, ids, straight-through gradients,
round trips, usage statistics, vocabulary sizes, k-means init and dead-code restart."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import config_io
from maskgen.models import factory
from maskgen.models import quantizers as q
from maskgen.models.sizes import code_count, token_layout
from maskgen.models.vqgan import VQGAN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("fast_compile")

KINDS = {
    "vq": dict(quantizer_type="vq", codebook_size=32),
    "vq_lookup": dict(quantizer_type="vq", codebook_size=32, vq_lookup_dim=3),
    "fsq": dict(quantizer_type="fsq", fsq_levels=(4, 3, 5)),
    "lfq": dict(quantizer_type="lfq", lfq_bits=5),
    "lfq_normalized": dict(quantizer_type="lfq", lfq_bits=5, lfq_normalize=True),
}
CODES = {"vq": 32, "vq_lookup": 32, "fsq": 60, "lfq": 32, "lfq_normalized": 32}


def _tokenizer(**kwargs):
    base = dict(codebook_size=32, embedding_dim=6, filters=8, num_res_blocks=1,
                channel_multipliers=(1, 2), image_channels=1, norm_groups=4)
    return VQGAN(**dict(base, **kwargs))


def _images(n=3, size=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, size, size, 1)), jnp.float32)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_quantizer_shapes_ids_in_range_and_decode_of_ids_matches_reconstruction(kind):
    model = _tokenizer(**KINDS[kind])
    images = _images()
    variables = model.init(jax.random.key(0), images)
    assert model.num_codes == CODES[kind]
    recon, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    ids = np.asarray(aux["encoding_indices"])
    assert recon.shape == images.shape and ids.shape == (3, 4, 4) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < model.num_codes
    for name in ("codebook_loss", "commitment_loss", "entropy_loss", "quantizer_loss"):
        assert aux[name].shape == () and np.isfinite(float(aux[name]))
    # Tokens a transformer samples decode through `lookup`: ids -> codes -> decoder.
    decoded = jax.jit(lambda v, t: model.apply(v, t, method="decode_from_indices"))(variables, ids)
    np.testing.assert_allclose(decoded, recon, atol=1e-5)
    quantized, _ = model.apply(variables, images, method="encode")
    looked_up = model.apply(variables, jnp.asarray(ids), method=lambda m, t: m.quantizer.lookup(t))
    np.testing.assert_allclose(looked_up, quantized, atol=1e-6)


def test_default_vq_keeps_the_official_quantizer_tree_and_the_options_extend_it():
    variables = nn.meta.unbox(_tokenizer().init(jax.random.key(0), _images(1)))
    assert {k: v.shape for k, v in variables["params"]["quantizer"].items()} == {"codebook": (32, 6)}
    lookup = nn.meta.unbox(_tokenizer(vq_lookup_dim=3).init(jax.random.key(0), _images(1)))
    lookup = lookup["params"]["quantizer"]
    assert sorted(lookup) == ["codebook", "project_in", "project_out"]
    assert lookup["codebook"].shape == (32, 3)
    # fsq with as many dims as levels needs no projection (and so no parameters at all).
    fsq = _tokenizer(quantizer_type="fsq", fsq_levels=(3,) * 6).init(jax.random.key(0), _images(1))
    assert "quantizer" not in fsq["params"]


def test_straight_through_gradients_are_the_identity_through_the_rounding():
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
    vq = q.VectorQuantizer(codebook_size=16, embedding_dim=4)
    params = vq.init(jax.random.key(0), z)
    grad = jax.grad(lambda x: jnp.sum(vq.apply(params, x)[0]))(z)
    np.testing.assert_allclose(grad, np.ones(z.shape))
    grad = jax.grad(lambda x: jnp.sum(q.lfq_quantize(x)[0]))(z)
    np.testing.assert_allclose(grad, np.ones(z.shape))
    levels = (8, 5, 3, 4)
    half = np.array([v // 2 for v in levels], np.float32)
    grad = jax.grad(lambda x: jnp.sum(q.fsq_quantize(x, levels)))(z)
    expect = jax.grad(lambda x: jnp.sum(q.fsq_bound(x, levels) / half))(z)
    np.testing.assert_allclose(grad, expect, rtol=1e-6)
    assert float(jnp.min(jnp.abs(grad))) > 0  # rounding alone would give zero gradient


def test_fsq_rounds_to_the_levels_and_ids_are_mixed_radix():
    levels = (3, 4)
    z = jnp.asarray(np.random.default_rng(2).normal(size=(500, 2)) * 3, jnp.float32)
    codes = np.asarray(q.fsq_quantize(z, levels))
    digits = np.round(codes * [1, 2] + [1, 2]).astype(int)
    assert set(digits[:, 0]) == {0, 1, 2} and set(digits[:, 1]) == {0, 1, 2, 3}
    np.testing.assert_array_equal(q.fsq_codes_to_ids(jnp.asarray(codes), levels),
                                  digits[:, 0] + 3 * digits[:, 1])


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 5, 3), (2, 6)])
def test_fsq_round_trip_ids_codes_ids_is_exact(levels):
    ids = jnp.arange(math.prod(levels), dtype=jnp.int32)
    codes = q.fsq_ids_to_codes(ids, levels)
    assert float(jnp.max(jnp.abs(codes))) <= 1.0
    np.testing.assert_array_equal(q.fsq_codes_to_ids(codes, levels), ids)


@pytest.mark.parametrize("normalize", [False, True])
def test_lfq_round_trip_ids_codes_ids_is_exact(normalize):
    bits = 6
    ids = jnp.arange(2 ** bits, dtype=jnp.int32)
    codes = q.lfq_ids_to_codes(ids, bits, normalize)
    np.testing.assert_allclose(jnp.abs(codes), 1 / math.sqrt(bits) if normalize else 1.0)
    np.testing.assert_array_equal(q.lfq_codes_to_ids(codes), ids)
    quantized, _ = q.lfq_quantize(codes * 0.3, normalize)
    np.testing.assert_array_equal(q.lfq_codes_to_ids(quantized), ids)
    np.testing.assert_array_equal(q.lfq_ids_to_codes(jnp.asarray([5]), 3), [[1, -1, 1]])  # 5 = 0b101


def test_vq_round_trip_ids_codes_ids_is_exact():
    for lookup_dim in (0, 3):
        vq = q.VectorQuantizer(codebook_size=16, embedding_dim=4, lookup_dim=lookup_dim)
        params = vq.init(jax.random.key(0), jnp.zeros((1, 1, 1, 4)))
        codes = vq.apply(params, method=lambda m: m.codes())
        dist = q.squared_distances(codes, codes)
        ids = jnp.argmin(dist, axis=-1)
        np.testing.assert_array_equal(ids, np.arange(16))


def test_lfq_entropy_loss_is_sample_minus_batch_entropy_over_all_codes():
    bits, temperature = 3, 0.5
    z = np.random.default_rng(3).normal(size=(1, 2, 5, bits)).astype(np.float32)
    lfq = q.LookupFreeQuantizer(bits=bits, embedding_dim=bits, commitment_cost=0.0,
                                entropy_loss_ratio=2.0, entropy_temperature=temperature)
    _, aux = lfq.apply({}, jnp.asarray(z))
    codes = np.array([[1 if (i >> b) & 1 else -1 for b in range(bits)] for i in range(2 ** bits)])
    logits = -((z.reshape(-1, 1, bits) - codes[None]) ** 2).sum(-1) / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sample = -(p * np.log(p)).sum(1).mean()
    avg = p.mean(0)
    batch = -(avg * np.log(avg + 1e-5)).sum()
    np.testing.assert_allclose(aux["entropy_loss"], 2.0 * (sample - batch), rtol=1e-4)
    ids = np.asarray(aux["encoding_indices"]).reshape(-1)
    np.testing.assert_array_equal(ids, ((z.reshape(-1, bits) > 0) * 2 ** np.arange(bits)).sum(1))
    assert float(aux["codebook_loss"]) == 0.0


def test_usage_statistics_match_a_hand_computed_case():
    counts = q.code_counts(jnp.asarray([[0, 0], [1, 3]]), 4)
    np.testing.assert_array_equal(counts, [2, 1, 0, 1])
    stats = q.usage_stats(counts)
    assert float(stats["codebook_usage"]) == 0.75
    # p = (1/2, 1/4, 0, 1/4): entropy 1.5 ln 2, perplexity 2**1.5.
    np.testing.assert_allclose(stats["perplexity"], 2 ** 1.5, rtol=1e-6)
    np.testing.assert_allclose(q.usage_stats(jnp.ones(8))["perplexity"], 8.0, rtol=1e-6)
    ema = q.update_usage_ema(jnp.ones(4), counts, decay=0.5)
    np.testing.assert_allclose(ema, 0.5 + 0.5 * np.array([2, 1, 0, 1]) * 4 / 4)


def _clusters(seed=0, k=4, per=50, dim=2):
    rng = np.random.default_rng(seed)
    centres = np.array([[10 * i, -5 * i] for i in range(k)], np.float32)[:, :dim]
    x = np.concatenate([c + 0.1 * rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    return centres, x[rng.permutation(len(x))]


def test_kmeans_init_finds_the_clusters_and_is_deterministic_given_the_key():
    centres, x = _clusters()
    codebook = jnp.full((4, 2), 0.01, jnp.float32)
    new = np.asarray(q.kmeans_codebook(jnp.asarray(x), codebook, jax.random.key(0)))
    order = np.argsort(new[:, 0])
    np.testing.assert_allclose(new[order], centres, atol=0.05)
    np.testing.assert_array_equal(new, q.kmeans_codebook(jnp.asarray(x), codebook, jax.random.key(0)))
    # Spherical variant: unit-norm centres.
    unit = q.kmeans_codebook(jnp.asarray(x) + 1.0, codebook, jax.random.key(1), normalize=True)
    np.testing.assert_allclose(jnp.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)


def test_kmeans_with_a_replace_mask_changes_only_those_codes():
    centres, x = _clusters()
    codebook = jnp.asarray(np.concatenate([centres[:2], np.full((2, 2), 100.0, np.float32)]))
    replace = jnp.asarray([False, False, True, True])
    new = np.asarray(q.kmeans_codebook(jnp.asarray(x), codebook, jax.random.key(2), replace=replace))
    np.testing.assert_array_equal(new[:2], np.asarray(codebook)[:2])  # bit for bit
    # The two free codes go to the two clusters no fixed code covers.
    np.testing.assert_allclose(new[2:][np.argsort(new[2:, 0])], centres[2:], atol=0.05)


def test_dead_code_restart_changes_only_dead_codes_to_batch_vectors():
    rng = np.random.default_rng(4)
    codebook = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(2, 4, 4, 3)) + 50.0, jnp.float32)
    usage = jnp.asarray([1.0, 0.001, 0.5, 0.0, 2.0, 0.02])
    new, new_usage, dead = q.restart_dead_codes(codebook, usage, features, jax.random.key(0), 0.03)
    np.testing.assert_array_equal(dead, [False, True, False, True, False, True])
    new, codebook = np.asarray(new), np.asarray(codebook)
    np.testing.assert_array_equal(new[~np.asarray(dead)], codebook[~np.asarray(dead)])
    flat = np.asarray(features).reshape(-1, 3)
    for row in new[np.asarray(dead)]:
        assert np.any(np.all(flat == row, axis=1))  # an actual vector of this batch
    assert len({tuple(r) for r in new[np.asarray(dead)]}) == 3  # distinct draws
    np.testing.assert_array_equal(new_usage, np.where(dead, 1.0, usage))
    # Nothing below the threshold: the codebook comes back unchanged.
    same, _, none = q.restart_dead_codes(jnp.asarray(codebook), jnp.ones(6), features,
                                         jax.random.key(1), 0.03)
    np.testing.assert_array_equal(same, codebook)
    assert not np.any(none)


def _debug_cfg():
    return config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))


def test_vocabulary_follows_the_quantizers_code_count():
    cfg = _debug_cfg()
    assert token_layout(cfg).codebook_size == cfg.tokenizer.codebook_size == 32
    cfg.tokenizer.quantizer = "fsq"
    cfg.tokenizer.fsq_levels = [8, 5, 5, 5]
    layout = token_layout(cfg)
    assert layout.codebook_size == 1000 and layout.vocab_size == 1000 + cfg.num_classes + 1 + 1
    assert factory.transformer_model(cfg).vocab_size == layout.vocab_size
    assert factory.tokenizer_model(cfg).num_codes == 1000
    cfg.tokenizer.quantizer = "lfq"
    cfg.tokenizer.lfq_bits = 7
    assert token_layout(cfg).codebook_size == 128 == factory.tokenizer_model(cfg).num_codes
    assert code_count(dict(codebook_size=64)) == 64  # configs written before the quantizer key


def test_bad_quantizer_configs_are_clear_errors():
    cfg = _debug_cfg()
    cfg.tokenizer.quantizer = "rvq"
    with pytest.raises(ValueError, match=r"tokenizer.quantizer must be one of \('vq', 'fsq', 'lfq'\)"):
        factory.tokenizer_model(cfg)
    with pytest.raises(ValueError, match="tokenizer.quantizer"):
        token_layout(cfg)
    cfg.tokenizer.quantizer = "fsq"
    for levels in ([8, 1, 5], []):
        cfg.tokenizer.fsq_levels = levels
        with pytest.raises(ValueError, match="tokenizer.fsq_levels must be a non-empty list of ints >= 2"):
            factory.tokenizer_model(cfg)
    cfg.tokenizer.quantizer = "lfq"
    for bits in (0, 17):
        cfg.tokenizer.lfq_bits = bits
        with pytest.raises(ValueError, match=r"tokenizer.lfq_bits must be an int in \[1, 16\]"):
            token_layout(cfg)
    with pytest.raises(ValueError, match="vq_lookup_dim"):
        _tokenizer(vq_lookup_dim=-1).check_config()


def test_tokenizer_step_restarts_only_dead_codes_and_reports_usage():
    """One step with and one without the restart from the same state: live rows are the optimiser's."""
    from maskgen.training import iterators, optimizer, train_state
    from maskgen.training import tokenizer_step as tts
    cfg = _debug_cfg()
    cfg.tokenizer_train.gan_weight = 0.0
    vqgan, disc = factory.tokenizer_model(cfg), factory.discriminator_model(cfg)
    images = np.stack([iterators.synthetic_image(0, i, 4, 16, 3)[0] for i in range(4)])
    batch = {"image": jnp.asarray(images), "label": jnp.zeros((4,), jnp.int32)}
    results = {}
    for threshold in (0.0, 0.995):  # 0.995: a code used at < half the uniform rate this step dies
        tcfg = cfg.tokenizer_train
        tcfg.vq_restart_threshold = threshold
        tx, lr = optimizer.adamw(tcfg, 10)
        init = tts.make_init(vqgan, disc, tx, tx, (16, 16, 3), tcfg)
        state = train_state.materialize(init, jax.random.key(0), None)
        step = jax.jit(tts.make_train_step(vqgan, disc, tx, tx, lr, tcfg, 0.9))
        results[threshold] = step(state, batch, jax.random.key(1))
    (plain, m_plain), (restarted, m) = results[0.0], results[0.995]
    ids = np.asarray(vqgan.apply({"params": state.params}, batch["image"], method="encode_to_indices"))
    counts = np.bincount(ids.reshape(-1), minlength=32)
    assert float(m_plain["codebook_usage"]) == pytest.approx(np.mean(counts > 0))
    dead = counts * 32 / counts.sum() < 0.5
    assert 0 < dead.sum() < 32 and float(m["restarted_codes"]) == dead.sum()
    assert "restarted_codes" not in m_plain and "code_usage" not in plain.extra
    new = np.asarray(restarted.params["quantizer"]["codebook"])
    np.testing.assert_array_equal(new[~dead], np.asarray(plain.params["quantizer"]["codebook"])[~dead])
    latents = np.asarray(vqgan.apply({"params": state.params}, batch["image"],
                                     method="encode_latents")).reshape(-1, new.shape[1])
    for row in new[dead]:  # an encoder output of this batch (to the rounding of jit vs eager)
        assert np.min(np.abs(latents - row).max(axis=1)) < 1e-5
    np.testing.assert_array_equal(np.asarray(restarted.extra["code_usage"])[dead], 1.0)
    for a, b in zip(jax.tree.leaves(restarted.params["decoder"]), jax.tree.leaves(plain.params["decoder"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_run_with_dead_code_restarts_passes_the_preflight_and_resumes(tmp_path):
    """The codes' usage EMA is part of the tokenizer state: the preflight's shape check and a rerun
    (the default job restarts dead codes) must expect it, not call the checkpoint foreign."""
    from maskgen import checkpoint as ckpt_lib
    from maskgen.training import preflight, trainer
    cfg = _debug_cfg()
    cfg.stages = ("tokenizer",)
    cfg.dataset.synthetic_examples = 32
    cfg.tokenizer_train.update(dict(num_train_steps=2, vq_restart_threshold=0.5, gan_weight=0.0))
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(cfg, workdir)
    scfg = trainer.stage_config(cfg, "tokenizer")
    preflight.check_checkpoints(cfg, "tokenizer", scfg, workdir)  # no CheckpointMismatchError
    cfg.tokenizer_train.num_train_steps = 3
    trainer.train_and_evaluate(cfg, workdir)  # resumes from step 2
    assert ckpt_lib.StageCheckpoints(os.path.join(workdir, "tokenizer"), read_only=True).steps()[-1] == 3
    # Without restarts the same checkpoint is another model's state: named, not silently restored.
    cfg.tokenizer_train.vq_restart_threshold = 0.0
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="code_usage"):
        preflight.check_checkpoints(cfg, "tokenizer", trainer.stage_config(cfg, "tokenizer"), workdir)
