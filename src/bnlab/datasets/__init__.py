"""Datasets for the experiments: Fashion-MNIST (the default) and MNIST, from IDX files, checked.

    images, labels = bnlab.datasets.load("fashion-mnist", "train")      # uint8 [60000, 28, 28], uint8 [60000]
    x, y = bnlab.datasets.load_tensors("mnist", "test")                  # float32 [10000, 784] in [0, 1], int64
    bnlab.datasets.locate("fashion-mnist", "test")                       # where the files are, without reading them

Files are looked for in `data_dir`, else `$BNLAB_DATA`; then Debian's /usr/share/datasets/<name>; then the user
cache (~/.cache/bnlab/<name>); and downloaded into the cache if absent (see `bnlab.datasets.loader`). Anything
wrong with a file raises `DatasetError`, whose message names the file and says what to do.
"""

from bnlab.datasets.download import download_file
from bnlab.datasets.errors import DatasetError
from bnlab.datasets.idx import read_idx, write_idx
from bnlab.datasets.loader import DatasetFiles, cache_dir, get_spec, load, load_tensors, locate
from bnlab.datasets.mnist import DATASETS, DEFAULT_DATASET, FASHION_MNIST, MNIST
from bnlab.datasets.spec import DatasetSpec, FileSpec, SplitSpec

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "FASHION_MNIST",
    "MNIST",
    "DatasetError",
    "DatasetFiles",
    "DatasetSpec",
    "FileSpec",
    "SplitSpec",
    "cache_dir",
    "download_file",
    "get_spec",
    "load",
    "load_tensors",
    "locate",
    "read_idx",
    "write_idx",
]
