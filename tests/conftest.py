"""Test session set-up: 8 virtual CPU devices (for sharding tests), before JAX starts."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL_SMALL = SHARED / "reference" / "official_small"


@pytest.fixture(scope="session")
def official_small():
    """The official-code reference set (inputs, outputs, checkpoints)."""
    import numpy as np
    if not OFFICIAL_SMALL.exists():
        raise FileNotFoundError(f"reference data missing: {OFFICIAL_SMALL} (clone with ../shared beside it)")
    ref = dict(np.load(OFFICIAL_SMALL / "reference.npz"))
    ref["_dir"] = OFFICIAL_SMALL
    return ref


@pytest.fixture(scope="module")
def fast_compile():
    """Tiny models: XLA's optimisation passes cost more compile time than they save at run time."""
    import jax
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
