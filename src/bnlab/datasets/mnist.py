"""Fashion-MNIST (bnlab's default dataset) and MNIST: files, checksums, classes and mirrors.

Where each checksum comes from (never typed in from memory; re-check them if you edit one):

Fashion-MNIST, gzip files (`sha256`, `size`): tensorflow/datasets `tensorflow_datasets/url_checksums/fashion_mnist.txt`
and pytorch/vision `torchvision/prototype/datasets/_builtin/mnist.py` (`_CHECKSUMS`) give the same four values. They
were also confirmed on this machine from Debian's package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist):
Debian's .gz files carry the official deflate streams with the gzip header's file name and time stripped (each is
shorter by exactly the length of the name plus its NUL); putting back the name and the original time (1504176606 for
train, 1504176627 for t10k, i.e. 2017-08-31) rebuilds files whose MD5s equal those published in the official README
(zalandoresearch/fashion-mnist, copy in /usr/share/doc/dataset-fashion-mnist/README.md.gz) and whose sha256 equal the
values below. Decompressed content (`raw_sha256`, `raw_size`): computed from Debian's files; the same four values are
pinned by several unrelated public projects (e.g. a Rust crate and Python loaders that download from zalando's
repository), one of them noting they were derived from archives matching the publisher's MD5s.

MNIST, gzip files: tensorflow/datasets `url_checksums/mnist.txt` (sha256 and size) and pytorch/vision's prototype
`mnist.py` (`_CHECKSUMS`) agree, as do several other public projects. Decompressed content: not checked here (MNIST
cannot be downloaded on the machine this was written on); the four values are pinned identically by several
independent public projects (a Go CLI pinning both the archive's and the extracted file's sha256, a CMake fetch
script, Makefiles, shell scripts). The decompressed sizes follow from the IDX header: 16 + N*784 and 8 + N bytes.
"""

from __future__ import annotations

from bnlab.datasets.spec import DatasetSpec, FileSpec, SplitSpec

__all__ = ["DATASETS", "DEFAULT_DATASET", "FASHION_MNIST", "MNIST"]

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    splits={
        "train": SplitSpec(
            images=FileSpec(
                "train-images-idx3-ubyte.gz",
                sha256="3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                size=26_421_880,
                raw_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                raw_size=47_040_016,
            ),
            labels=FileSpec(
                "train-labels-idx1-ubyte.gz",
                sha256="a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                size=29_515,
                raw_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                raw_size=60_008,
            ),
            count=60_000,
        ),
        "test": SplitSpec(
            images=FileSpec(
                "t10k-images-idx3-ubyte.gz",
                sha256="346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                size=4_422_102,
                raw_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                raw_size=7_840_016,
            ),
            labels=FileSpec(
                "t10k-labels-idx1-ubyte.gz",
                sha256="67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                size=5_148,
                raw_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                raw_size=10_008,
            ),
            count=10_000,
        ),
    },
    mirrors=(
        # The official links (the README's table; plain HTTP, which the sha256 check makes safe), then the
        # official repository, which serves the same bytes.
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    homepage="https://github.com/zalandoresearch/fashion-mnist",
)

MNIST = DatasetSpec(
    name="mnist",
    classes=tuple(str(digit) for digit in range(10)),
    splits={
        "train": SplitSpec(
            images=FileSpec(
                "train-images-idx3-ubyte.gz",
                sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                size=9_912_422,
                raw_sha256="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                raw_size=47_040_016,
            ),
            labels=FileSpec(
                "train-labels-idx1-ubyte.gz",
                sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                size=28_881,
                raw_sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                raw_size=60_008,
            ),
            count=60_000,
        ),
        "test": SplitSpec(
            images=FileSpec(
                "t10k-images-idx3-ubyte.gz",
                sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                size=1_648_877,
                raw_sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                raw_size=7_840_016,
            ),
            labels=FileSpec(
                "t10k-labels-idx1-ubyte.gz",
                sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                size=4_542,
                raw_sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                raw_size=10_008,
            ),
            count=10_000,
        ),
    },
    mirrors=(
        # The official site (which now often refuses scripted downloads), then the mirrors torchvision
        # (torchvision/datasets/mnist.py) and tensorflow-datasets (url_checksums/mnist.txt) use.
        "http://yann.lecun.com/exdb/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    homepage="http://yann.lecun.com/exdb/mnist/",
)

DEFAULT_DATASET = "fashion-mnist"
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (FASHION_MNIST, MNIST)}
