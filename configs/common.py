"""Defaults shared by every maskgen config; each config file edits a copy.

Layout of a config (every key is overridable as `--config.a.b=value`):
  seed, image_size, image_channels, num_classes (real classes), null_class
  dataset.*            tfds name or local folder, splits, augmentation
  tokenizer.*          VQGAN architecture (maskgen.models.vqgan)
  discriminator.*      StyleGAN-style discriminator for tokenizer training
  transformer.*        MaskGIT transformer architecture (maskgen.models.transformer)
  sampling.*           default decoding settings (maskgen.scheduler)
  stages               which stages train.py runs, in order
  num_train_steps, checkpoint_every_steps, ...   apply to each stage unless the
                       stage block sets its own (a stage value of None inherits)
  tokenizer_train.*, transformer_train.*         per-stage optimisation settings
  mesh.*               device mesh axes (data, fsdp, tensor); -1 fills the rest
"""
import ml_collections
from ml_collections.config_dict import placeholder

from maskgen.sampling import SAMPLING_DEFAULTS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.prng_impl = "threefry2x32"  # jax PRNG for dropout and sampling keys: threefry2x32 | rbg | unsafe_rbg | ...
    c.image_size = 256
    c.image_channels = 3
    c.num_classes = 1000
    c.null_class = True  # reserve a null class id for classifier-free guidance

    c.dataset = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir=placeholder(str), train_split="train", eval_split="validation",
        random_crop=False, random_flip=True, worker_count=0, prefetch=2,
        synthetic_examples=256,  # size of the "synthetic" / "synthetic_tokens" datasets
        max_examples=ml_collections.config_dict.placeholder(int)))  # use only the first N (smoke runs)

    c.tokenizer = ml_collections.ConfigDict(dict(
        codebook_size=1024, embedding_dim=256, filters=128, num_res_blocks=2,
        channel_multipliers=[1, 1, 2, 2, 4], norm_groups=32, conv_impl="xla",
        commitment_cost=0.25, entropy_loss_ratio=0.1, dtype="float32",
        # vq | fsq | lfq. codebook_size counts vq codes; fsq has prod(fsq_levels) codes, lfq 2**lfq_bits
        # (the transformer's vocabulary follows). entropy_loss_ratio / _temperature weigh lfq's entropy
        # terms too; vq_lookup_dim > 0 = factorised l2-normalised vq lookup in that many dims.
        quantizer="vq", fsq_levels=(8, 5, 5, 5), lfq_bits=10, lfq_normalize=False, vq_lookup_dim=0))

    c.discriminator = ml_collections.ConfigDict(dict(filters=128, channel_multipliers=[2, 4, 4, 4, 4]))

    c.transformer = ml_collections.ConfigDict(dict(
        num_layers=24, hidden_size=768, num_heads=16, mlp_dim=3072,
        dropout_rate=0.1, attention_dropout_rate=0.1, dtype="float32",
        attention="auto",  # auto | scan | xla | cudnn | splash (maskgen.models.attention)
        remat="none"))  # none | full | save_qkv_out | a jax.checkpoint_policies name (maskgen.models.remat)

    # One set of decoding defaults, shared with bundles that carry no sampling block.
    c.sampling = ml_collections.ConfigDict(dict(SAMPLING_DEFAULTS, temperature_end=placeholder(float)))

    c.stages = ("tokenizer", "transformer")
    c.num_train_steps = 100_000
    c.batch_size = 256  # global
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 10_000
    c.sample_every_steps = 10_000
    c.eval_num_samples = 1000  # generated images per quality evaluation (datasets with a quality metric)
    c.quality_train_examples = ml_collections.config_dict.placeholder(int)  # classifier data (None = all)
    c.quality_classifier_epochs = 4

    c.tokenizer_train = ml_collections.ConfigDict(dict(
        num_train_steps=placeholder(int), batch_size=placeholder(int),
        checkpoint_every_steps=placeholder(int),
        learning_rate=1e-4, b1=0.0, b2=0.99, weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
        grad_clip=1.0, ema_decay=0.999,
        l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0, perceptual_weights=placeholder(str),
        gan_weight=0.1, gan_loss="non_saturating", adaptive_gan_weight=False,
        disc_start_step=0, disc_learning_rate=1e-4, regularizer="r1", r1_weight=10.0,
        lecam_weight=0.0, lecam_ema_decay=0.999,
        # vq only (fsq / lfq have no codebook): vq_init "random" | "kmeans" (k-means++ on the encoder
        # outputs of vq_kmeans_batches batches before step 0); vq_restart_threshold > 0 restarts codes
        # whose usage EMA (1.0 = uniform use) falls below it with random encoder outputs of the batch.
        vq_init="random", vq_kmeans_batches=4, vq_kmeans_iterations=10,
        vq_restart_threshold=0.0, vq_usage_ema_decay=0.99))

    # Decoder fine-tuning on frozen tokens (stage "decoder", run after "tokenizer"): only the decoder
    # trains, with label-free losses (L1/L2, adversarial, discriminator feature matching, LeCam).
    c.decoder_train = ml_collections.ConfigDict(dict(
        num_train_steps=placeholder(int), batch_size=placeholder(int),
        checkpoint_every_steps=placeholder(int),
        learning_rate=1e-4, b1=0.5, b2=0.99, weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
        grad_clip=1.0, ema_decay=0.999,
        l1_weight=1.0, l2_weight=0.0, gan_weight=0.1, gan_loss="hinge", feature_matching_weight=1.0,
        disc_start_step=0, disc_learning_rate=1e-4, lecam_weight=0.001, lecam_ema_decay=0.999))

    c.transformer_train = ml_collections.ConfigDict(dict(
        num_train_steps=placeholder(int), batch_size=placeholder(int),
        checkpoint_every_steps=placeholder(int),
        learning_rate=1e-4, b1=0.9, b2=0.96, weight_decay=0.045, warmup_steps=5000,
        lr_schedule="cosine", grad_clip=1.0, ema_decay=0.9999,
        label_smoothing=0.1, mask_schedule="cosine", min_masking_rate=0.5, loss_on_all=False,
        label_dropout=0.1, pretokenize=True,
        tokenizer_workdir=placeholder(str)))  # None: this run

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Overrides of maskgen.sharding.RULES: logical axis name -> list of mesh axes (or lists of axes).
    c.sharding_rules = ml_collections.ConfigDict()
    c.distributed = False  # call jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set)
    return c
