"""Download one file from a list of mirrors, verified, without ever leaving a partial file under its final name.

Standard library only (urllib). Each attempt streams into a temporary file beside the destination while hashing,
checks the size and sha256, and only then renames the file into place (os.replace, atomic on one file system). The
temporary file is removed on any failure, Ctrl-C included; only a hard kill can leave one behind, and it never
carries the final name. Two processes downloading the same file each use their own temporary file; both verify, and
the last rename wins with identical bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from bnlab.datasets.errors import DatasetError

__all__ = ["DEFAULT_TIMEOUT_S", "download_file"]

DEFAULT_TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole file
_CHUNK = 1 << 20


class _BadDownload(Exception):
    """This mirror served something other than the expected file; try the next one."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def download_file(
    urls: Sequence[str],
    dest: str | os.PathLike,
    *,
    sha256: str,
    size: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    log: Callable[[str], None] | None = _stderr,
) -> str:
    """Download the file at the first of `urls` that serves the expected bytes to `dest`; return that URL.

    A mirror that fails (network error, HTTP error, timeout, connection closed early, wrong size or sha256) is
    reported through `log` and the next one is tried. If all fail, raises `DatasetError` listing each URL and why it
    failed, and saying where to put the file by hand. `dest`'s folder is created if needed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        if log:
            log(f"bnlab: downloading {url} -> {dest}")
        try:
            _fetch(url, dest, sha256=sha256, size=size, timeout=timeout)
            return url
        except (OSError, http.client.HTTPException, ValueError, _BadDownload) as error:
            reason = _describe(error, timeout)
            failures.append(f"  {url}: {reason}")
            if log:
                log(f"bnlab: {url} failed ({reason})")
    tried = "\n".join(failures) or "  (no URL to try)"
    raise DatasetError(
        f"could not download {dest.name}; every mirror failed:\n{tried}\n"
        f"Download it by hand from one of these URLs (or copy it from another machine), check that its sha256 is "
        f"{sha256}, and put it at {dest} (or in a folder named by the BNLAB_DATA environment variable)."
    )


def _fetch(url: str, dest: Path, *, sha256: str, size: int | None, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "bnlab-datasets (python urllib)"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                announced = response.headers.get("Content-Length")
                digest, received = hashlib.sha256(), 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if size is not None and received > size:  # don't stream a wrong, maybe huge, file to the end
                        raise _BadDownload(f"serves more than the expected {size} bytes")
        # http.client returns a short body without an error when the server closes early: check the length here.
        if announced is not None and announced.isdigit() and received != int(announced):
            raise _BadDownload(f"connection closed after {received} of {announced} bytes")
        if size is not None and received != size:
            raise _BadDownload(f"served {received} bytes, expected {size}")
        if digest.hexdigest() != sha256:
            raise _BadDownload(f"served a file with sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, TimeoutError):
        return f"timed out (no data for {timeout:g} s)"
    return str(error) or type(error).__name__
