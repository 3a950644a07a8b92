"""maskgen: masked generative image transformers (MaskGIT) in JAX/Flax.

    import maskgen
    model = maskgen.load("workdir/fashion_mnist")   # tokenizer + transformer + params + config
    from maskgen import editing, sampling, scheduler
"""

__version__ = "0.1.0"


def load(path, config=None, device=None):
    """A trained or converted model bundle (see `maskgen.bundle.load`)."""
    from maskgen.bundle import load as _load  # deferred: keeps `import maskgen` light
    return _load(path, config=config, device=device)
