"""Named random streams of a training run, all derived from `cfg.seed`.

Every stream a run draws from has a name here, so two purposes can never share
a salt by accident and a reader can see at a glance where randomness enters.
The numbers are the ones the stages have always used: changing one changes
what an existing config trains, so add new purposes instead of renumbering.
Keys are made with `cfg.prng_impl` (maskgen.prng), so dropout masks and every
other draw of a step use the configured generator.
"""
import jax

from maskgen import prng

# jax.random.fold_in salts of the device-side keys.
KEY_SALTS = {
    "transformer_init": 1,  # transformer parameters
    "transformer_step": 3,  # masking, label dropout, dropout in each step (folded with the step)
    "tokenizer_init": 4,  # VQGAN + discriminator parameters
    "tokenizer_step": 6,  # tokenizer step randomness (folded with the step)
    "tokenizer_kmeans": 8,  # k-means++ seeding of the vq codebook (tokenizer_train.vq_init = kmeans)
    "decoder_init": 9,  # the decoder stage's fresh discriminator
    "decoder_step": 10,  # decoder-stage step (draws nothing today)
}
# Offsets added to the seed of host-side (numpy / grain) data streams.
DATA_SEED_OFFSETS = {
    "transformer_data": 2,  # transformer-stage example order (token cache, synthetic tokens, images)
    "tokenizer_data": 5,  # tokenizer-stage example order and augmentation
    "tokenizer_kmeans_data": 7,  # the batches whose encoder outputs seed the vq codebook
    "decoder_data": 9,  # decoder-stage example order
}


def key(seed: int, purpose: str, impl: str = prng.DEFAULT) -> jax.Array:
    """The device key of a named purpose, of PRNG implementation `impl` (config.prng_impl)."""
    if purpose not in KEY_SALTS:
        raise ValueError(f"unknown PRNG purpose {purpose!r}; known: {sorted(KEY_SALTS)}")
    return jax.random.fold_in(prng.make_key(int(seed), impl), KEY_SALTS[purpose])


def data_seed(seed: int, purpose: str) -> int:
    """The integer seed of a named host-side data stream."""
    if purpose not in DATA_SEED_OFFSETS:
        raise ValueError(f"unknown data stream {purpose!r}; known: {sorted(DATA_SEED_OFFSETS)}")
    return int(seed) + DATA_SEED_OFFSETS[purpose]
