"""IDX files (the MNIST format): read and write, gzip-compressed or raw, with every length checked.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per
dimension, then the values in C order, big-endian. The format has no checksum and no end marker, so a truncated or
padded file is caught only by comparing the payload's length with what the header announces; `parse_idx` does, and
raises a `DatasetError` that names the file and the fix rather than returning a silently reshaped array.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from bnlab.datasets.errors import REPLACE_HINT, DatasetError

__all__ = ["IDX_DTYPES", "gunzip_if_compressed", "parse_idx", "read_idx", "write_idx"]

# The format's type codes (0x08 is the one MNIST uses); the multi-byte ones are big-endian on disk.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {("u", 1): 0x08, ("i", 1): 0x09, ("i", 2): 0x0B, ("i", 4): 0x0C, ("f", 4): 0x0D, ("f", 8): 0x0E}
_GZIP_MAGIC = b"\x1f\x8b"

Source = str | os.PathLike


def _bad(source: Source, problem: str) -> DatasetError:
    return DatasetError(f"{source}: {problem}; {REPLACE_HINT}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a writable array in native byte order.

    Raises `DatasetError` naming the file for a bad gzip stream, a wrong magic, a truncated header or payload, or
    bytes after the payload; `OSError` (e.g. FileNotFoundError) if the file cannot be read at all.
    """
    path = Path(path)
    return parse_idx(gunzip_if_compressed(path.read_bytes(), path), path)


def gunzip_if_compressed(data: bytes, source: Source = "<bytes>") -> bytes:
    """The IDX bytes inside `data`: decompressed if it is gzip (by its magic, whatever its name), else as is.

    A source named `*.gz` must be gzip: an uncompressed file under that name is more likely a broken download than a
    renamed file, so it is refused.
    """
    if data[:2] != _GZIP_MAGIC:
        if str(source).endswith(".gz"):
            raise _bad(source, "is named .gz but is not gzip-compressed (it does not start with the gzip magic 1f 8b)")
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise _bad(source, "is a truncated gzip stream (it ends before the end-of-stream marker)") from None
    except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError: bad header, CRC or length, junk after
        raise _bad(source, f"is not a valid gzip stream ({error})") from None


def parse_idx(data: bytes, source: Source = "<bytes>") -> np.ndarray:
    """Decode uncompressed IDX bytes, checking the magic, the header length and the exact payload length."""
    if len(data) < 4:
        raise _bad(source, f"is truncated: {len(data)} bytes of IDX data, fewer than the 4 bytes of the IDX magic")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or code not in IDX_DTYPES or ndim == 0:
        codes = " ".join(f"{c:02x}" for c in IDX_DTYPES)
        raise _bad(
            source,
            f"is not an IDX file: its magic is {data[:4].hex(' ')}, expected 00 00 <type> <ndim> with type one of "
            f"{codes} and ndim >= 1",
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _bad(
            source, f"is truncated in its header: {len(data)} bytes, the header of a {ndim}-D IDX file has {header}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    count = math.prod(shape)
    expected, actual = count * dtype.itemsize, len(data) - header
    if actual < expected:
        raise _bad(
            source,
            f"is truncated: its header announces shape {shape} of {dtype.name} ({expected} bytes of data), "
            f"but only {actual} bytes follow",
        )
    if actual > expected:
        raise _bad(
            source, f"has {actual - expected} unexpected bytes after the {expected} bytes of data its header announces"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    # A copy in native byte order: frombuffer's view is read-only, and torch.from_numpy warns on read-only arrays.
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write `array` as an IDX file, gzip-compressed when `path` ends in `.gz`; return the path.

    Supported dtypes are the format's: uint8, int8, int16, int32, float32, float64 (others raise ValueError). The
    gzip header carries no name and mtime 0, so the same array always gives the same bytes (and sha256). The file is
    written beside `path` under a temporary name and renamed into place, so `path` never holds a partial file.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"write_idx: IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64"
        )
    if not 1 <= array.ndim <= 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"write_idx: IDX needs 1 to 255 dimensions each below 2**32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    _write_atomically(path, data)
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
