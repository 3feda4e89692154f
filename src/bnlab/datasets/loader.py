"""Find, check and load a dataset split: numpy arrays as stored, or float tensors ready for training.

Where the files are looked for, first match wins (a folder matches when it holds both files of the split, each as
`.gz` or decompressed; the two files of a split always come from the same folder):

1. `data_dir` if given, else the folder named by the `BNLAB_DATA` environment variable: first `<dir>/<name>/`, then
   `<dir>` itself (the subfolder first because MNIST and Fashion-MNIST use the same file names);
2. `SYSTEM_DATA_DIR/<name>` (Debian's `/usr/share/datasets/`; package `dataset-fashion-mnist` installs
   Fashion-MNIST there; no Debian package ships MNIST);
3. the user cache, `$XDG_CACHE_HOME/bnlab/<name>` (default `~/.cache/bnlab/<name>`);
4. if `download=True`, the missing files are downloaded into the user cache.

A `data_dir` (or `BNLAB_DATA`) without the split's files does not end the search: the official files from the later
places are used. Pass `download=False` to get an error, listing every place looked in, when nothing is found.

There is no in-process cache: each call reads the files again (well under a second for Fashion-MNIST's training
split). Callers that load repeatedly keep the arrays themselves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnlab.datasets.download import DEFAULT_TIMEOUT_S, download_file
from bnlab.datasets.errors import REPLACE_HINT, DatasetError
from bnlab.datasets.idx import gunzip_if_compressed, parse_idx
from bnlab.datasets.mnist import DATASETS, DEFAULT_DATASET
from bnlab.datasets.spec import DatasetSpec, FileSpec, SplitSpec

__all__ = ["ENV_VAR", "SYSTEM_DATA_DIR", "DatasetFiles", "cache_dir", "get_spec", "load", "load_tensors", "locate"]

ENV_VAR = "BNLAB_DATA"
# Module-level so that tests (and unusual installs) can point it elsewhere.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


@dataclass(frozen=True)
class DatasetFiles:
    """Where a split's two files were found.

    `source` is "data_dir", "BNLAB_DATA", "system", "cache" or "download" (just downloaded into the cache).
    `verified` says whether files from there are checked against the official sha256 by default: yes for the
    system folder, the cache and downloads; no for a folder the user names, which may hold other data of the same
    layout (a subset for a quick test, a variant).
    """

    images: Path
    labels: Path
    source: str
    verified: bool


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The registered dataset called `name` ("fashion-mnist", "mnist"); a DatasetSpec is returned as is."""
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}") from None


def cache_dir(name: str) -> Path:
    """The user cache folder for dataset `name`: `$XDG_CACHE_HOME/bnlab/<name>`, default `~/.cache/bnlab/<name>`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative path.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "bnlab" / name


def _search_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[tuple[str, Path, bool]]:
    """(source, folder, verified by default) in search order; see the module docstring."""
    dirs: list[tuple[str, Path, bool]] = []
    env = os.environ.get(ENV_VAR, "")
    user = ("data_dir", Path(data_dir)) if data_dir is not None else (ENV_VAR, Path(env)) if env else None
    if user is not None:
        source, base = user
        dirs += [(source, base / spec.name, False), (source, base, False)]
    dirs.append(("system", SYSTEM_DATA_DIR / spec.name, True))
    dirs.append(("cache", cache_dir(spec.name), True))
    return dirs


def _find_file(directory: Path, file: FileSpec) -> Path | None:
    for candidate in (directory / file.name, directory / file.raw_name):
        if candidate.is_file():
            return candidate
    return None


def locate(
    name: str | DatasetSpec = DEFAULT_DATASET, split: str = "train", data_dir: str | os.PathLike | None = None
) -> DatasetFiles | None:
    """Where the split's files are, in the search order of this module's docstring; None if nowhere.

    Only looks: nothing is read, checked or downloaded.
    """
    spec = get_spec(name)
    split_spec = spec.split(split)
    for source, directory, verified in _search_dirs(spec, data_dir):
        images, labels = _find_file(directory, split_spec.images), _find_file(directory, split_spec.labels)
        if images is not None and labels is not None:
            return DatasetFiles(images, labels, source, verified)
    return None


def load(
    name: str | DatasetSpec = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    verify: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split: (images uint8 [N, 28, 28], labels uint8 [N]).

    Files are found as described in this module's docstring. Every file gets the structural checks: valid gzip and
    IDX, images [N, 28, 28] uint8, labels [N] uint8 below the number of classes, the same N in both.

    `verify` chooses the checksum check: None (default) checks the sha256 of files from the system folder, the cache
    and downloads, and only the structure of files in `data_dir` / `BNLAB_DATA`, which may legitimately hold other
    data of the same layout (tests write tiny files there); True checks everywhere; False nowhere except the
    download itself, which is always verified before the file gets its final name. A file passes the check if its
    own sha256 is the official .gz's or if its decompressed content's is the official content's, so recompressed
    (Debian's) and decompressed copies pass too. The example count of the split (60000 / 10000) is checked together
    with the checksums, and only then: it is what tells an official file from a subset, so it makes no sense to
    demand it of the files a checksum does not vouch for.

    Without checksums, a file that is an official file of another dataset or split (MNIST's in place of
    Fashion-MNIST's, test in place of train) is still refused: the file names are the same, the mistake is easy.

    Raises `DatasetError` (naming the file and the fix) for a missing, damaged or wrong file, or a failed download;
    ValueError for an unknown dataset or split.
    """
    spec = get_spec(name)
    split_spec = spec.split(split)
    files = locate(spec, split, data_dir)
    if files is None:
        if not download:
            raise DatasetError(_not_found_message(spec, split, split_spec, data_dir))
        files = _download_split(spec, split_spec, timeout)
    check = files.verified if verify is None else verify
    images = _read_checked(files.images, split_spec.images, spec, check)
    labels = _read_checked(files.labels, split_spec.labels, spec, check)
    _check_pair(images, labels, files, spec, split_spec, check_count=check)
    return images, labels


def load_tensors(
    name: str | DatasetSpec = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    verify: bool | None = None,
    flatten: bool = True,
    device: torch.device | str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`load`, as tensors ready for training: (float32 images scaled to [0, 1], int64 labels [N]).

    Images are [N, 784] with `flatten=True` (MLPs), else [N, 1, 28, 28] (convolutions). No mean/std normalization:
    that is the experiment's choice, and with batch norm after the first layer it matters little.
    """
    images, labels = load(name, split, data_dir, download=download, verify=verify, timeout=timeout)
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32).div_(255.0)
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return x, torch.from_numpy(labels).to(device=device, dtype=torch.int64)


def _download_split(spec: DatasetSpec, split_spec: SplitSpec, timeout: float) -> DatasetFiles:
    """Download into the user cache whichever of the split's two files it lacks."""
    directory = cache_dir(spec.name)
    paths = []
    for file in (split_spec.images, split_spec.labels):
        path = _find_file(directory, file)
        if path is None:
            path = directory / file.name
            download_file(spec.urls(file), path, sha256=file.sha256, size=file.size, timeout=timeout)
        paths.append(path)
    return DatasetFiles(paths[0], paths[1], "download", verified=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _official_files(spec: DatasetSpec) -> dict[str, str]:
    """sha256 (of the .gz and of the content) -> 'the <dataset> <file>', for every known official file."""
    known: dict[str, str] = {}
    for other in (*DATASETS.values(), spec):
        for split_spec in other.splits.values():
            for file in (split_spec.images, split_spec.labels):
                known[file.sha256] = known[file.raw_sha256] = f"{other.name}'s {file.name}"
    return known


def _read_checked(path: Path, file: FileSpec, spec: DatasetSpec, verify: bool) -> np.ndarray:
    data = path.read_bytes()
    content = gunzip_if_compressed(data, path)
    file_hash = _sha256(data)
    if file_hash == file.sha256:  # the official .gz: nothing else to check
        return parse_idx(content, path)
    content_hash = file_hash if content is data else _sha256(content)
    if content_hash != file.raw_sha256:
        known = _official_files(spec)
        other = known.get(file_hash) or known.get(content_hash)
        if other is not None:  # checked even without `verify`: same file names, easy mistake
            raise DatasetError(f"{path} is {other}, not {spec.name}'s {file.name}; {REPLACE_HINT}")
        if verify:
            of_content = "" if content is data else f" (of its decompressed content: {content_hash})"
            origin = f" (from {spec.urls(file)[0]})" if spec.mirrors else ""
            raise DatasetError(
                f"{path}: checksum mismatch: its sha256 is {file_hash}{of_content}; expected {file.sha256} "
                f"(the official {file.name}) or {file.raw_sha256} (its decompressed content). The file is damaged "
                f"or not the official one: {REPLACE_HINT}{origin}"
            )
    return parse_idx(content, path)


def _check_pair(
    images: np.ndarray,
    labels: np.ndarray,
    files: DatasetFiles,
    spec: DatasetSpec,
    split_spec: SplitSpec,
    *,
    check_count: bool,
) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != spec.image_shape:
        rows, cols = spec.image_shape
        raise DatasetError(
            f"{files.images}: holds {images.dtype} of shape {images.shape}, expected uint8 images of shape "
            f"[N, {rows}, {cols}]; {REPLACE_HINT}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{files.labels}: holds {labels.dtype} of shape {labels.shape}, expected uint8 labels of shape [N]; "
            f"{REPLACE_HINT}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{files.images} holds {len(images)} images but {files.labels} holds {len(labels)} labels: the two "
            f"files do not belong together; replace both with the official files of the split"
        )
    if len(labels) and int(labels.max()) >= len(spec.classes):
        index = int(np.argmax(labels >= len(spec.classes)))
        raise DatasetError(
            f"{files.labels}: label {int(labels[index])} at index {index} is out of range for {spec.name}'s "
            f"{len(spec.classes)} classes (0 to {len(spec.classes) - 1}); {REPLACE_HINT}"
        )
    if check_count and len(images) != split_spec.count:
        raise DatasetError(
            f"{files.images}: holds {len(images)} examples, {spec.name}'s split holds {split_spec.count}; "
            f"{REPLACE_HINT}"
        )


def _not_found_message(spec: DatasetSpec, split: str, split_spec: SplitSpec, data_dir: object) -> str:
    places = "\n".join(f"  {source}: {directory}" for source, directory, _ in _search_dirs(spec, data_dir))
    names = " and ".join(f"{f.name} (or {f.raw_name})" for f in (split_spec.images, split_spec.labels))
    return (
        f"{spec.name} {split!r} split not found, and download=False. Looked for {names} in:\n{places}\n"
        f"Put the official files in one of these folders (from {spec.mirrors[0] if spec.mirrors else spec.homepage}"
        f"), or call with download=True."
    )
