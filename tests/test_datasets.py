"""bnlab.datasets: IDX round trips, every kind of bad file, the search order, checksums, and downloads.

Never touches the network, the real user cache or /usr/share/datasets (an autouse fixture points them at tmp_path),
except the one test that reads Debian's Fashion-MNIST when it is installed. Downloads go to a local HTTP server.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab import datasets
from bnlab.datasets import DatasetError, DatasetSpec, FileSpec, SplitSpec, download, loader, read_idx, write_idx

COUNTS = {"train": 6, "test": 4}
PREFIX = {"train": "train", "test": "t10k"}
REAL_SYSTEM_DIR = Path("/usr/share/datasets")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No BNLAB_DATA, the user cache and Debian's folder under tmp_path, no proxy between us and 127.0.0.1."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(loader, "SYSTEM_DATA_DIR", tmp_path / "system")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def names(split: str) -> tuple[str, str]:
    return f"{PREFIX[split]}-images-idx3-ubyte.gz", f"{PREFIX[split]}-labels-idx1-ubyte.gz"


def synthetic(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, COUNTS[split]])
    images = rng.integers(0, 256, size=(COUNTS[split], 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=COUNTS[split], dtype=np.uint8)
    return images, labels


def write_split(directory: Path, split: str = "train", *, gz: bool = True, seed: int = 0):
    """Write a synthetic split's two IDX files into `directory`; return (images, labels, images path, labels path)."""
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic(split, seed)
    paths = [directory / (name if gz else name.removesuffix(".gz")) for name in names(split)]
    write_idx(paths[0], images)
    write_idx(paths[1], labels)
    return images, labels, paths[0], paths[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tiny(tmp_path) -> tuple[DatasetSpec, dict[str, bytes]]:
    """A dataset spec for synthetic files, with their real checksums, and the files' bytes by name."""
    source = tmp_path / "tiny-source"
    for split in COUNTS:
        write_split(source, split)
    files = {path.name: path.read_bytes() for path in source.iterdir()}
    splits = {}
    for split in COUNTS:
        specs = []
        for name in names(split):
            data, raw = files[name], gzip.decompress(files[name])
            specs.append(FileSpec(name, sha256(data), len(data), sha256(raw), len(raw)))
        splits[split] = SplitSpec(*specs, count=COUNTS[split])
    spec = DatasetSpec(name="tiny", classes=tuple("abcdefghij"), splits=splits, mirrors=())
    return spec, files


# --- IDX files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("uint8", (3, 28, 28)), ("uint8", (7,)), ("int8", (2, 3)), ("int16", (4, 1)), ("int32", (5,)),
     ("float32", (2, 2, 2)), ("float64", (3,)), ("uint8", (0, 28, 28))],
)  # fmt: skip
def test_write_read_round_trip(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.flags.writeable
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_write_idx_is_deterministic_and_refuses_what_idx_cannot_store(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    first = write_idx(tmp_path / "a.gz", array).read_bytes()
    assert write_idx(tmp_path / "a.gz", array).read_bytes() == first
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "b", np.arange(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "c", np.uint8(3))


def _raw(tmp_path) -> bytes:
    return gzip.decompress(write_idx(tmp_path / "good.gz", synthetic("train")[0]).read_bytes())


BAD_FILES = {
    "truncated payload": ("bad", lambda raw: raw[:-10], "truncated"),
    "truncated header": ("bad", lambda raw: raw[:10], "truncated in its header"),
    "shorter than the magic": ("bad", lambda raw: raw[:3], "truncated"),
    "wrong magic": ("bad", lambda raw: b"\x12\x34" + raw[2:], "not an IDX file"),
    "unknown type code": ("bad", lambda raw: raw[:2] + b"\x07" + raw[3:], "not an IDX file"),
    "trailing bytes": ("bad", lambda raw: raw + b"\0\0\0", "3 unexpected bytes"),
    "trailing bytes inside gzip": ("bad.gz", lambda raw: gzip.compress(raw + b"xyz"), "3 unexpected bytes"),
    "truncated gzip": ("bad.gz", lambda raw: gzip.compress(raw)[:-20], "truncated gzip"),
    "corrupt gzip": ("bad.gz", lambda raw: _corrupt(gzip.compress(raw)), "not a valid gzip"),
    "junk after gzip": ("bad.gz", lambda raw: gzip.compress(raw) + b"junk", "not a valid gzip"),
    ".gz that is not gzip": ("bad.gz", lambda raw: raw, "not gzip-compressed"),
}


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 16]) + data[middle + 16 :]


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_idx_file_raises_dataset_error_naming_it_and_the_fix(tmp_path, case):
    name, make, problem = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(make(_raw(tmp_path)))
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "delete it so that it is downloaded again, or replace it with the official file" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("case", ["truncated payload", "truncated gzip", "wrong magic", "trailing bytes"])
def test_load_reports_the_bad_file(tmp_path, case):
    name, make, problem = BAD_FILES[case]
    data_dir = tmp_path / "data"
    *_, labels_path = write_split(data_dir, gz=name.endswith(".gz"))
    labels_path.write_bytes(make(read_raw(labels_path)))
    with pytest.raises(DatasetError, match=problem) as info:
        datasets.load("fashion-mnist", "train", data_dir=data_dir, download=False)
    assert str(labels_path) in str(info.value)


def read_raw(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# --- Finding and checking a split ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("subfolder", [False, True])
def test_load_from_data_dir(tmp_path, gz, subfolder):
    data_dir = tmp_path / "data"
    images, labels, *_ = write_split(data_dir / "fashion-mnist" if subfolder else data_dir, "test", gz=gz)
    got_images, got_labels = datasets.load("fashion-mnist", "test", data_dir=data_dir, download=False)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.uint8
    found = datasets.locate("fashion-mnist", "test", data_dir=data_dir)
    assert found.source == "data_dir" and not found.verified
    assert found.images.name == ("t10k-images-idx3-ubyte.gz" if gz else "t10k-images-idx3-ubyte")


def test_load_tensors_is_ready_for_training(tmp_path):
    images, labels, *_ = write_split(tmp_path)
    x, y = datasets.load_tensors("fashion-mnist", "train", data_dir=tmp_path)
    assert x.shape == (COUNTS["train"], 784) and x.dtype == torch.float32
    assert y.shape == (COUNTS["train"],) and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(images).reshape(-1, 784).float() / 255)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == labels.tolist()
    x4, _ = datasets.load_tensors("fashion-mnist", "train", data_dir=tmp_path, flatten=False)
    assert x4.shape == (COUNTS["train"], 1, 28, 28)


def test_bnlab_data_environment_variable(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    flat, *_ = write_split(env_dir, seed=1)
    monkeypatch.setenv("BNLAB_DATA", str(env_dir))
    np.testing.assert_array_equal(datasets.load("mnist", "train", download=False)[0], flat)
    assert datasets.locate("mnist", "train").source == "BNLAB_DATA"
    # <dir>/<name>/ comes before <dir>: MNIST and Fashion-MNIST share their file names.
    own, *_ = write_split(env_dir / "mnist", seed=2)
    np.testing.assert_array_equal(datasets.load("mnist", "train", download=False)[0], own)
    # An explicit data_dir wins over the variable.
    explicit, *_ = write_split(tmp_path / "explicit", seed=3)
    np.testing.assert_array_equal(datasets.load("mnist", "train", tmp_path / "explicit", download=False)[0], explicit)


def test_images_and_labels_count_mismatch_names_both_files(tmp_path):
    _, _, images_path, labels_path = write_split(tmp_path)
    write_idx(labels_path, np.zeros(COUNTS["train"] - 1, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"6 images but .* 5 labels") as info:
        datasets.load("fashion-mnist", "train", data_dir=tmp_path, download=False)
    assert str(images_path) in str(info.value) and str(labels_path) in str(info.value)


def test_label_out_of_range_names_the_labels_file(tmp_path):
    *_, labels_path = write_split(tmp_path)
    labels = np.zeros(COUNTS["train"], dtype=np.uint8)
    labels[3] = 10
    write_idx(labels_path, labels)
    with pytest.raises(DatasetError, match="label 10 at index 3 is out of range") as info:
        datasets.load("fashion-mnist", "train", data_dir=tmp_path, download=False)
    assert str(labels_path) in str(info.value)


@pytest.mark.parametrize(("shape", "dtype"), [((6, 27, 28), np.uint8), ((6, 784), np.uint8), ((6, 28, 28), np.int16)])
def test_images_of_the_wrong_shape_or_dtype_are_refused(tmp_path, shape, dtype):
    _, _, images_path, _ = write_split(tmp_path)
    write_idx(images_path, np.zeros(shape, dtype=dtype))
    with pytest.raises(DatasetError, match=r"expected uint8 images of shape \[N, 28, 28\]") as info:
        datasets.load("fashion-mnist", "train", data_dir=tmp_path, download=False)
    assert str(images_path) in str(info.value)


def test_data_dir_gets_structural_checks_only_unless_verify(tmp_path):
    write_split(tmp_path)  # 6 examples, not Fashion-MNIST's: fine for a data_dir
    assert len(datasets.load("fashion-mnist", "train", data_dir=tmp_path, download=False)[0]) == COUNTS["train"]
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        datasets.load("fashion-mnist", "train", data_dir=tmp_path, download=False, verify=True)
    assert datasets.FASHION_MNIST.split("train").images.sha256 in str(info.value)


def test_an_official_file_of_another_split_is_refused_even_unverified(tmp_path, tiny):
    spec, files = tiny
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for test_name, train_name in zip(names("test"), names("train"), strict=True):
        (data_dir / train_name).write_bytes(files[test_name])  # test files under the train names
    with pytest.raises(DatasetError, match=r"is tiny's t10k-images-idx3-ubyte\.gz, not tiny's train-images"):
        datasets.load(spec, "train", data_dir=data_dir, download=False)


def test_cache_files_are_verified_and_a_mismatch_is_reported(tmp_path, tiny):
    spec, files = tiny
    cache = datasets.cache_dir("tiny")
    assert cache == tmp_path / "xdg-cache" / "bnlab" / "tiny"
    cache.mkdir(parents=True)
    for name in names("train"):
        (cache / name).write_bytes(files[name])
    found = datasets.locate(spec, "train")
    assert found.source == "cache" and found.verified
    np.testing.assert_array_equal(datasets.load(spec, "train", download=False)[1], synthetic("train")[1])

    images_path = cache / names("train")[0]
    other_images = synthetic("train", seed=9)[0]  # a valid IDX file, just not the expected one
    write_idx(images_path, other_images)
    with pytest.raises(DatasetError, match="checksum mismatch") as info:
        datasets.load(spec, "train", download=False)
    message = str(info.value)
    expected = spec.split("train").images
    assert str(images_path) in message and expected.sha256 in message and expected.raw_sha256 in message
    assert sha256(images_path.read_bytes()) in message and "delete it so that it is downloaded again" in message


def test_system_folder_comes_before_the_cache_and_accepts_recompressed_or_raw_copies(tmp_path, tiny):
    spec, files = tiny
    images_name, labels_name = names("test")
    system = tmp_path / "system" / "tiny"
    system.mkdir(parents=True)
    # Debian-style: the same content, compressed differently; and a decompressed copy.
    (system / images_name).write_bytes(gzip.compress(gzip.decompress(files[images_name]), compresslevel=1, mtime=7))
    (system / labels_name.removesuffix(".gz")).write_bytes(gzip.decompress(files[labels_name]))
    cache = datasets.cache_dir("tiny")
    write_split(cache, "test", seed=5)  # would fail verification: proves the cache is not used
    found = datasets.locate(spec, "test")
    assert found.source == "system" and found.verified
    images, labels = datasets.load(spec, "test", download=False)
    np.testing.assert_array_equal(images, synthetic("test")[0])
    np.testing.assert_array_equal(labels, synthetic("test")[1])


def test_verified_files_must_hold_the_splits_count(tmp_path, tiny):
    spec, files = tiny
    spec = dataclasses.replace(
        spec, splits={**spec.splits, "train": dataclasses.replace(spec.splits["train"], count=7)}
    )
    cache = datasets.cache_dir("tiny")
    cache.mkdir(parents=True)
    for name in names("train"):
        (cache / name).write_bytes(files[name])
    with pytest.raises(DatasetError, match="holds 6 examples, tiny's split holds 7"):
        datasets.load(spec, "train", download=False)


def test_not_found_without_download_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match="download=False") as info:
        datasets.load("mnist", "test", data_dir=tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and str(tmp_path / "nowhere") in message
    assert str(tmp_path / "system" / "mnist") in message and str(datasets.cache_dir("mnist")) in message


def test_unknown_dataset_or_split_is_a_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.load("cifar")
    with pytest.raises(ValueError, match="no split 'val'"):
        datasets.load("mnist", "val")


# --- Downloads, from a local HTTP server ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Serves server.routes: path -> (behaviour, bytes); unknown paths get a 404."""

    def do_GET(self):
        behaviour, body = self.server.routes.get(self.path, ("missing", b""))
        if behaviour == "missing":
            self.send_error(404)
            return
        if behaviour == "stall":  # say nothing until the test ends (or 5 s)
            self.server.stop.wait(5.0)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "cut":  # announce the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    httpd.stop = threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def serve(server, mirror: str, behaviour: str, files: dict[str, bytes], *, wrong: bool = False) -> str:
    """Serve every file under /<mirror>/, as is or (wrong=True) with its bytes changed; return the mirror's URL."""
    for name, data in files.items():
        body = bytes(b ^ 1 for b in data) if wrong else data
        server.routes[f"/{mirror}/{name}"] = (behaviour, body)
    return f"{server.url}/{mirror}/"


def test_download_lands_under_the_final_name(server, tiny, capsys):
    spec, files = tiny
    spec = dataclasses.replace(spec, mirrors=(serve(server, "good", "ok", files),))
    images, labels = datasets.load(spec, "train")
    np.testing.assert_array_equal(images, synthetic("train")[0])
    np.testing.assert_array_equal(labels, synthetic("train")[1])
    cache = datasets.cache_dir("tiny")
    assert sorted(p.name for p in cache.iterdir()) == sorted(names("train"))  # only the split asked for, no temp
    assert all((cache / name).read_bytes() == files[name] for name in names("train"))
    assert datasets.locate(spec, "train").source == "cache"
    assert f"{server.url}/good/train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_a_mirror_serving_wrong_bytes_is_skipped(server, tiny, capsys):
    spec, files = tiny
    bad = serve(server, "bad", "ok", files, wrong=True)
    spec = dataclasses.replace(spec, mirrors=(bad, serve(server, "good", "ok", files)))
    np.testing.assert_array_equal(datasets.load(spec, "test")[0], synthetic("test")[0])
    assert f"{bad}t10k-images-idx3-ubyte.gz failed (served a file with sha256" in capsys.readouterr().err
    assert sorted(p.name for p in datasets.cache_dir("tiny").iterdir()) == sorted(names("test"))


def test_all_mirrors_bad_lists_every_url_and_leaves_nothing(server, tiny):
    spec, files = tiny
    bad = serve(server, "bad", "ok", files, wrong=True)
    missing = f"{server.url}/missing/"
    spec = dataclasses.replace(spec, mirrors=(bad, missing))
    with pytest.raises(DatasetError, match="every mirror failed") as info:
        datasets.load(spec, "train")
    message = str(info.value)
    assert f"{bad}train-images-idx3-ubyte.gz: served a file with sha256" in message
    assert f"{missing}train-images-idx3-ubyte.gz: HTTP 404" in message
    assert spec.split("train").images.sha256 in message and str(datasets.cache_dir("tiny")) in message
    assert list(datasets.cache_dir("tiny").iterdir()) == []


def test_a_connection_closed_mid_file_leaves_no_file(server, tiny):
    spec, files = tiny
    cut = serve(server, "cut", "cut", files)
    spec = dataclasses.replace(spec, mirrors=(cut,))
    with pytest.raises(DatasetError, match=f"{cut}train-images-idx3-ubyte.gz: (connection closed after|.*Incomplete)"):
        datasets.load(spec, "train")
    assert list(datasets.cache_dir("tiny").iterdir()) == []  # neither the final name nor a temporary file


def test_a_silent_server_times_out_and_leaves_no_file(server, tiny):
    spec, files = tiny
    spec = dataclasses.replace(spec, mirrors=(serve(server, "stall", "stall", files),))
    with pytest.raises(DatasetError, match="timed out"):
        datasets.load(spec, "train", timeout=0.3)
    assert list(datasets.cache_dir("tiny").iterdir()) == []


def test_only_the_missing_file_is_downloaded(server, tiny):
    spec, files = tiny
    images_name, labels_name = names("train")
    cache = datasets.cache_dir("tiny")
    cache.mkdir(parents=True)
    (cache / images_name).write_bytes(files[images_name])
    spec = dataclasses.replace(spec, mirrors=(serve(server, "labels-only", "ok", {labels_name: files[labels_name]}),))
    np.testing.assert_array_equal(datasets.load(spec, "train")[1], synthetic("train")[1])
    assert sorted(p.name for p in cache.iterdir()) == sorted(names("train"))


# --- The real thing, where Debian's package is installed ------------------------------------------------------------


@pytest.mark.skipif(
    not (REAL_SYSTEM_DIR / "fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_test_split(monkeypatch):
    monkeypatch.setattr(loader, "SYSTEM_DATA_DIR", REAL_SYSTEM_DIR)
    found = datasets.locate("fashion-mnist", "test")
    assert found.source == "system" and found.verified
    images, labels = datasets.load("fashion-mnist", "test", download=False, verify=True)  # sha256 checked
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    expected = datasets.FASHION_MNIST.split("test")
    assert sha256(gzip.decompress(found.labels.read_bytes())) == expected.labels.raw_sha256


def test_an_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the stream: the temporary file goes, nothing appears under the final name."""

    class Response(io.BytesIO):
        def __init__(self, body: bytes):
            super().__init__(body)
            self.headers = {"Content-Length": str(len(body))}

        def read(self, size=-1):
            if self.tell():
                raise KeyboardInterrupt
            return super().read(10)

    monkeypatch.setattr(download.urllib.request, "urlopen", lambda request, timeout: Response(b"x" * 100))
    with pytest.raises(KeyboardInterrupt):
        download.download_file(["http://example.invalid/f.gz"], tmp_path / "f.gz", sha256="0" * 64, log=None)
    assert list(tmp_path.iterdir()) == []
