"""MNIST for the benchmarks: find, check, download, or stand in for it.

``get_mnist(data_dir)`` returns the four arrays of MNIST as uint8/int64 tensors. The
directory comes from the caller (a command-line option), else the environment variable
``ADAMX_MNIST_DIR``, else ``~/.cache/adamx/mnist``. Each of the four files may lie in
either layout people have on disk:

    DIR/train-images-idx3-ubyte[.gz]              (the files as the mirrors serve them)
    DIR/MNIST/raw/train-images-idx3-ubyte[.gz]    (what torchvision leaves behind)

compressed with gzip or not (told apart by the gzip magic bytes, not by the name). Every
file is checked by the SHA-256 of its *decompressed* bytes, so any compression of the
right data passes and anything else fails loudly (``MnistChecksumError``).

When a file is missing, it is downloaded from the public mirrors into DIR and checked.
When that fails too (no network), ``get_mnist`` says so and returns a synthetic,
MNIST-shaped, learnable data set whose ``source`` is ``"synthetic"``; callers label every
figure made from it.
"""

import gzip
import hashlib
import os
import struct
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENV_VAR = "ADAMX_MNIST_DIR"
DEFAULT_DIR = Path("~/.cache/adamx/mnist")

# name -> (SHA-256 of the decompressed file, its size in bytes)
CHECKSUMS = {
    "train-images-idx3-ubyte":
        ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte":
        ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte":
        ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte":
        ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = CHECKSUMS

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 10.0

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes (third byte of the magic number) -> (torch dtype, item size, big-endian fmt)
_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
              0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}


class MnistError(RuntimeError):
    """MNIST could not be read (a file is malformed or missing)."""


class MnistChecksumError(MnistError):
    """A file was found but its decompressed bytes are not the expected ones."""


class MnistDownloadError(MnistError):
    """No mirror delivered a file that passed its check."""


@dataclass
class Mnist:
    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str                 # "real" or "synthetic"
    where: str = ""             # the directory read, or how the synthetic set was made
    notes: list = field(default_factory=list)

    @property
    def synthetic(self) -> bool:
        return self.source != "real"

    @property
    def label(self) -> str:
        """What every report made from this data should say about it."""
        return "real MNIST" if not self.synthetic else "SYNTHETIC MNIST-shaped data"


def resolve_dir(data_dir=None) -> Path:
    """The directory to use: the argument, else $ADAMX_MNIST_DIR, else the cache dir."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(data_dir).expanduser()


def find_file(root, name):
    """The path holding ``name`` under ``root`` in either layout, gzip or raw, or None."""
    root = Path(root)
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def read_decompressed(path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic."""
    return read_decompressed_bytes(Path(path).read_bytes(), str(path))


def read_decompressed_bytes(payload: bytes, where="") -> bytes:
    if payload[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(payload)
        except (OSError, EOFError) as exc:
            raise MnistError(f"{where}: not a valid gzip file ({exc})") from exc
    return payload


def check_bytes(name, data, checksums=CHECKSUMS, where=""):
    """Raises MnistChecksumError unless ``data`` is the expected content of ``name``."""
    expected, size = checksums[name]
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise MnistChecksumError(
            f"{where or name}: SHA-256 of the decompressed bytes is {digest} "
            f"({len(data)} bytes), expected {expected} ({size} bytes). The file is corrupt or "
            "not the MNIST file of that name; delete it (it will be downloaded again) or "
            "point --data-dir / $ADAMX_MNIST_DIR at a good copy.")


def parse_idx(data: bytes, where="") -> torch.Tensor:
    """An IDX file's contents as a tensor of its own dtype and shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise MnistError(f"{where}: not an IDX file (magic {data[:4].hex()})")
    dtype, itemsize = _IDX_TYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistError(f"{where}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(data) != header + count * itemsize:
        raise MnistError(f"{where}: IDX header says {dims} ({header + count * itemsize} bytes) "
                         f"but the file has {len(data)} bytes")
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    if itemsize > 1:  # IDX is big-endian
        flat = flat.view(-1, itemsize).flip(1).contiguous().view(dtype)
    else:
        flat = flat.view(dtype)
    return flat.reshape(dims)


def load_file(root, name, checksums=CHECKSUMS, verify=True):
    """Reads, checks and parses one file; None when it is not there."""
    path = find_file(root, name)
    if path is None:
        return None
    data = read_decompressed(path)
    if verify:
        check_bytes(name, data, checksums, where=str(path))
    return parse_idx(data, where=str(path))


def download(root, names, mirrors=MIRRORS, checksums=CHECKSUMS, timeout=DOWNLOAD_TIMEOUT_S,
             log=None):
    """Fetches ``names`` (as ``NAME.gz``) into ``root``, trying the mirrors in order.

    A file is kept only when its decompressed bytes pass the check. A mirror that fails to
    deliver one file is not asked for the others. Raises MnistDownloadError with every
    mirror's failure when some file could not be had.
    """
    root = Path(root)
    failures = []
    remaining = list(names)
    for mirror in mirrors:
        if not remaining:
            break
        for name in list(remaining):
            url = mirror + name + ".gz"
            if log:
                log(f"mnist: downloading {url}")
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
                check_bytes(name, read_decompressed_bytes(payload, url), checksums, where=url)
            except (urllib.error.URLError, OSError, ValueError, MnistError) as exc:
                failures.append(f"{url}: {exc}")
                break  # this mirror is down or serves something else; try the next one
            root.mkdir(parents=True, exist_ok=True)
            target = root / (name + ".gz")
            tmp = target.with_suffix(".gz.part")
            tmp.write_bytes(payload)
            tmp.replace(target)
            remaining.remove(name)
    if remaining:
        raise MnistDownloadError("could not download " + ", ".join(remaining) + ":\n  "
                                 + "\n  ".join(failures))


def load_mnist(root, checksums=CHECKSUMS, verify=True) -> Mnist:
    """All four files from ``root``; MnistError naming the missing ones if any are absent."""
    arrays = {}
    missing = []
    for name in checksums:
        t = load_file(root, name, checksums, verify)
        if t is None:
            missing.append(name)
        arrays[name] = t
    if missing:
        raise MnistError(f"{root}: missing {', '.join(missing)}")
    return _assemble(arrays, source="real", where=str(root))


def _assemble(arrays, source, where):
    train_x, train_y = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    test_x, test_y = arrays[TEST_IMAGES], arrays[TEST_LABELS]
    for x, y, what in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise MnistError(f"{where}: {what} images {tuple(x.shape)} and labels "
                             f"{tuple(y.shape)} do not fit together")
    return Mnist(train_x.to(torch.uint8), train_y.to(torch.int64), test_x.to(torch.uint8),
                 test_y.to(torch.int64), source=source, where=where)


def synthetic_mnist(n_train=60000, n_test=10000, seed=0) -> Mnist:
    """An MNIST-shaped stand-in: 28x28 uint8 images in 10 classes, each class a smooth
    random prototype plus per-image shifts and noise, so that an MLP learns it (losses
    fall) without it being trivially separable. Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    # Smooth prototypes: low-resolution random patterns upsampled to 28x28.
    low = torch.rand(10, 1, 7, 7, generator=g)
    protos = torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear",
                                             align_corners=False)[:, 0]
    protos = (protos - protos.amin(dim=(1, 2), keepdim=True)).clamp_(min=0)
    protos = protos / protos.amax(dim=(1, 2), keepdim=True)
    protos = (protos > 0.55).float() * protos  # mostly-zero background, like MNIST

    def make(n):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = protos[labels]
        # Random shifts of up to 2 pixels per image, intensity jitter and noise.
        shift = torch.randint(0, 25, (n,), generator=g)
        for k in range(25):
            sel = shift == k
            images[sel] = torch.roll(images[sel], shifts=(k // 5 - 2, k % 5 - 2), dims=(1, 2))
        images = images * (0.6 + 0.4 * torch.rand(n, 1, 1, generator=g))
        images = images + 0.35 * torch.randn(n, 28, 28, generator=g)
        images = (images.clamp_(0, 1) * 255).round_().to(torch.uint8)
        return images, labels

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Mnist(train_x, train_y, test_x, test_y, source="synthetic",
                 where=f"synthetic_mnist(seed={seed})")


def get_mnist(data_dir=None, *, allow_download=True, allow_synthetic=True, mirrors=MIRRORS,
              checksums=CHECKSUMS, timeout=DOWNLOAD_TIMEOUT_S, log=None) -> Mnist:
    """MNIST from ``data_dir`` (see ``resolve_dir``), downloaded there when missing, else
    (when ``allow_synthetic``) a synthetic stand-in, with the reason in ``notes``.

    A file that is present but fails its checksum is an error, never silently replaced:
    the user pointed at it.
    """
    if log is None:
        def log(msg):
            print(msg, file=sys.stderr, flush=True)
    root = resolve_dir(data_dir)
    missing = [name for name in checksums if find_file(root, name) is None]
    notes = []
    if missing and allow_download:
        log(f"mnist: {len(missing)} file(s) missing in {root}; trying the public mirrors")
        try:
            download(root, missing, mirrors, checksums, timeout, log)
            notes.append(f"downloaded {', '.join(missing)} into {root}")
            missing = []
        except MnistDownloadError as exc:
            notes.append(str(exc))
    if not missing:
        data = load_mnist(root, checksums)
        data.notes = notes
        return data
    reason = (f"MNIST is not in {root} (missing {', '.join(missing)})"
              + ("" if allow_download else "; downloading was not allowed")
              + ("" if not notes else "; " + notes[-1]))
    if not allow_synthetic:
        raise MnistError(reason)
    log("mnist: " + "*" * 70)
    log(f"mnist: {reason}")
    log("mnist: running on a SYNTHETIC MNIST-shaped data set instead. Timings stay "
        "meaningful; losses and accuracies are NOT comparable with MNIST's. Set "
        f"--data-dir or ${ENV_VAR} to a directory with the MNIST IDX files.")
    log("mnist: " + "*" * 70)
    data = synthetic_mnist()
    data.notes = notes + [reason]
    return data


def add_arguments(p):
    """The data options every MNIST benchmark takes (argparse parser ``p``); call
    ``apply_quick`` on the parsed arguments."""
    p.add_argument("--data-dir", default=None,
                   help=f"MNIST directory (default ${ENV_VAR}, else {DEFAULT_DIR})")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--no-download", action="store_true", help="never try the mirrors")
    p.add_argument("--synthetic", action="store_true",
                   help="use the synthetic MNIST-shaped set even if MNIST is available")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 1 epoch on 2048 train / 1000 test images")


def apply_quick(args):
    """--quick: 1 epoch on the first 2048 train / 1000 test images (unless limited)."""
    if args.quick:
        args.epochs = 1
        args.limit_train = args.limit_train or 2048
        args.limit_test = args.limit_test or 1000
    return args
