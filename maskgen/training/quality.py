"""End-of-training quality report for a model bundle trained on Fashion-MNIST.

Samples `per_class` images of every class with the config's decoding settings,
scores them with the project's Fashion-MNIST classifier (class accuracy and a
Fréchet distance in its feature space, with the real-train vs real-test floor)
and measures the tokenizer's reconstruction error and its code use on the real test
split (`codebook_usage`: fraction of the quantizer's codes that some test image's
tokens use; `codebook_perplexity`: exp entropy of their histogram).
"""
import json
import time
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from maskgen import paths

QUALITY_DATASETS = ("fashion_mnist",)


def supports_quality(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.dataset.name in QUALITY_DATASETS


def _reconstruct_fn(bundle: Any) -> Callable:
    import jax
    tok, params = bundle.tokenizer, {"params": bundle.params["tokenizer"]}

    @jax.jit
    def run(x: jax.Array) -> jax.Array:
        recon, _ = tok.apply(params, x)
        return jnp.round(jnp.clip(recon, 0, 1) * 255)

    return lambda images_uint8: np.asarray(run(jnp.asarray(images_uint8, jnp.float32) / 255.0))


def code_usage(bundle: Any, images_uint8: np.ndarray, batch_size: int = 500) -> dict:
    """codebook_usage and codebook_perplexity of the tokenizer's ids over `images` (uint8 batches)."""
    import jax

    from maskgen.models import quantizers
    tok, params = bundle.tokenizer, {"params": bundle.params["tokenizer"]}
    num_codes = tok.num_codes

    @jax.jit
    def counts(x: jax.Array) -> jax.Array:
        ids = tok.apply(params, x, method=tok.encode_to_indices)
        return quantizers.code_counts(ids, num_codes)

    total = np.zeros((num_codes,), np.float64)
    images_uint8 = np.asarray(images_uint8)
    for start in range(0, len(images_uint8), batch_size):
        batch = jnp.asarray(images_uint8[start:start + batch_size], jnp.float32) / 255.0
        total += np.asarray(counts(batch))
    stats = quantizers.usage_stats(total)
    return dict(codebook_usage=float(stats["codebook_usage"]),
                codebook_perplexity=float(stats["perplexity"]))


def quality_report(bundle: Any, per_class: int = 100, seed: int = 0, cache_dir: str | None = None,
                   data_dir: str | None = None,
                   batch_size: int = 250, sampling_overrides: dict | None = None, progress: bool = True) -> dict:
    """Class accuracy, Fréchet distance (+ floor) and reconstruction error of a Fashion-MNIST bundle."""
    from maskgen import data
    from maskgen.eval.fashion import fashion_quality
    from maskgen.eval.reconstruction import reconstruction_error
    from maskgen.sampling import Sampler, decode_config_from, recap_config_from

    cfg = bundle.config
    if not supports_quality(cfg):
        raise ValueError(f"the quality report needs a Fashion-MNIST model, this one was trained on "
                         f"{cfg.dataset.name!r}")
    from maskgen.eval.classifier import TrainConfig

    data_dir = data_dir or cfg.dataset.data_dir
    limit = cfg.get("quality_train_examples")
    train = data.load_arrays("fashion_mnist", "train", data_dir, max_examples=limit)
    test = data.load_arrays("fashion_mnist", "test", data_dir, max_examples=limit)
    classifier = TrainConfig(epochs=int(cfg.get("quality_classifier_epochs", 4)))
    sampling = dict(cfg.sampling)
    sampling.update(sampling_overrides or {})
    sampler = Sampler(bundle, decode_config_from(sampling, bundle.token_grid), recap_config_from(sampling))
    labels = np.repeat(np.arange(bundle.layout.num_real_classes), per_class)
    start = time.perf_counter()
    samples = sampler.generate(labels, seed=seed, batch_size=batch_size, progress=progress)
    sample_seconds = time.perf_counter() - start
    reconstruct, kept = _reconstruct_fn(bundle), []

    def reconstruct_and_keep(batch: Any) -> Any:
        kept.append(reconstruct(batch))
        return kept[-1]

    # One pass: the error over >= 2000 test images, and as many reconstructions as samples for a
    # Fréchet comparable with the samples' and the floor's.
    count = min(len(labels), len(test[0]))
    recon = reconstruction_error(test[0][:max(2000, count)], reconstruct_and_keep, batch_size=250)
    recon_images = np.concatenate(kept)[:count].astype(np.uint8)
    report = fashion_quality(samples["images"], labels, cache_dir, train=train, test=test,
                             config=classifier, progress=progress, reconstructions=recon_images)
    report.update(reconstruction_mse=float(recon["mse"]), reconstruction_psnr=float(recon["psnr"]),
                  sampling_seconds=sample_seconds, sampling=sampling, **code_usage(bundle, test[0]))
    return report, samples


def write_report(report: dict, path: str) -> None:
    text = json.dumps(report, indent=1, default=float)
    paths.write_text(path, text)


def format_report(report: dict) -> str:
    return (f"class accuracy {report['class_accuracy']:.3f} (real test images: "
            f"{report['real_test_accuracy']:.3f}) | Fréchet {report['frechet']:.2f} "
            f"(real-train vs real-test floor {report['frechet_floor']:.2f}, ratio "
            f"{report['frechet'] / max(report['frechet_floor'], 1e-9):.2f}) | tokenizer reconstruction "
            f"PSNR {report['reconstruction_psnr']:.2f} dB, Fréchet {report['reconstruction_frechet']:.2f}, "
            f"codebook usage {report.get('codebook_usage', float('nan')):.1%}")


def default_cache_dir(workdir: str) -> str:
    return paths.join(workdir, "eval_cache")
