"""Datasets for maskgen: IDX reading, tfds builders (no TensorFlow), grain.

Typical use:

    builder = prepare_dataset("fashion_mnist", data_dir)      # once
    loader = make_loader("fashion_mnist", data_dir=data_dir, batch_size=64)
    images, labels = load_arrays("fashion_mnist", "test", data_dir)
"""
from maskgen.data.builders import FashionMnist, ImageFolder, default_data_dir, prepare_dataset, scan_image_folder
from maskgen.data.idx import FASHION_MNIST_DIR, load_fashion_mnist_idx, read_idx
from maskgen.data.pipeline import DatasetSummary, dataset_summary, load_arrays, make_loader

__all__ = [
    "FASHION_MNIST_DIR", "DatasetSummary", "FashionMnist", "ImageFolder",
    "dataset_summary", "default_data_dir", "load_arrays",
    "load_fashion_mnist_idx", "make_loader", "prepare_dataset", "read_idx",
    "scan_image_folder",
]
