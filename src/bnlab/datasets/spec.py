"""What a dataset is made of: its files with their checksums, its splits, its classes and where to download it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DatasetSpec", "FileSpec", "SplitSpec"]


@dataclass(frozen=True)
class FileSpec:
    """One official file, with the checksums of both forms it may be found in.

    `sha256` and `size` are those of the gzip file as the mirrors serve it. `raw_sha256` and `raw_size` are those of
    its decompressed content: they identify the data however it was compressed (Debian, for one, ships the same data
    recompressed without the original gzip header's file name and time, so its .gz files have other checksums) and
    check a file that was decompressed by hand.
    """

    name: str  # as served, e.g. "train-images-idx3-ubyte.gz"
    sha256: str
    size: int
    raw_sha256: str
    raw_size: int

    @property
    def raw_name(self) -> str:
        """The decompressed file's name: `name` without `.gz`."""
        return self.name.removesuffix(".gz")


@dataclass(frozen=True)
class SplitSpec:
    """A split: its images file, its labels file and how many examples the official files hold."""

    images: FileSpec
    labels: FileSpec
    count: int


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset in the MNIST layout: uint8 images and uint8 labels in IDX files, one pair per split."""

    name: str
    classes: tuple[str, ...]
    splits: Mapping[str, SplitSpec]
    mirrors: tuple[str, ...]  # base URLs, tried in order; a file's URL is the base plus its name
    image_shape: tuple[int, int] = (28, 28)
    homepage: str = ""

    def split(self, split: str) -> SplitSpec:
        """The named split; ValueError listing the choices for an unknown one."""
        try:
            return self.splits[split]
        except KeyError:
            raise ValueError(f"{self.name} has no split {split!r}; choose from {sorted(self.splits)}") from None

    def urls(self, file: FileSpec) -> list[str]:
        """Where to download `file`, one URL per mirror, in the mirrors' order."""
        return [f"{mirror.rstrip('/')}/{file.name}" for mirror in self.mirrors]
