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
MNIST-shaped stand-in of about MNIST's difficulty (``synthetic_mnist``) whose ``source`` is
``"synthetic"``; callers label every table and figure made from it.
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


# The synthetic stand-in's digits: strokes between the points of a 12 x 20 px box (x, y in
# units of its half-width and half-height), a seven-segment skeleton with diagonals.
_POINTS = {"TL": (-1, -1), "TR": (1, -1), "ML": (-1, 0), "MR": (1, 0), "BL": (-1, 1),
           "BR": (1, 1), "TC": (0, -1), "BC": (0, 1)}
_STROKES = {"a": ("TL", "TR"), "b": ("TR", "MR"), "c": ("MR", "BR"), "d": ("BL", "BR"),
            "e": ("ML", "BL"), "f": ("TL", "ML"), "g": ("ML", "MR"), "i": ("TC", "BC"),
            "k": ("TR", "BL"), "h": ("ML", "TC"), "z": ("TR", "BC")}
# Each class's ways of writing it (strings of strokes). Classes share most strokes (8 holds
# 0, 3, 5, 6 and 9 but one stroke), so they overlap as handwritten digits do.
_FORMS = [["abcdef"], ["i", "bc", "hi"], ["abged", "abkd"], ["abgcd"], ["fgbc", "hgbc"],
          ["afgcd"], ["afgedc", "fgedc"], ["abc", "az", "ak"], ["abcdefg"],
          ["abcdfg", "abcfg", "abfgz"]]
SYNTHETIC_STYLES = 12  # prototypes per class (form, jittered corners, stroke width)
# Per image: the share that carries faint strokes of another prototype (ambiguous digits),
# rotation, shear and elastic displacement (standard deviations; rotation in radians, the
# others in units of half the image), and the pixel noise (of the [0, 1] range).
SYNTHETIC_OVERLAY, SYNTHETIC_ROTATION, SYNTHETIC_SHEAR = 0.05, 0.15, 0.2
SYNTHETIC_ELASTIC, SYNTHETIC_NOISE = 0.05, 0.10


def _strokes_image(strokes, width):
    """One anti-aliased 28x28 image: ink = clamp(width + 0.5 - distance to the nearest
    stroke, 0, 1); ``strokes`` is a [k, 4] tensor of (x0, y0, x1, y1) in pixels."""
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pixel = torch.stack([xs, ys], -1)[None]                   # [1, 28, 28, 2]
    a, b = strokes[:, None, None, :2], strokes[:, None, None, 2:]
    ab = b - a
    t = (((pixel - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    distance = (pixel - (a + t[..., None] * ab)).norm(dim=-1).amin(0)
    return (width + 0.5 - distance).clamp(0, 1)


def _prototypes(g):
    """[10 * SYNTHETIC_STYLES, 28, 28] float images in [0, 1], class-major: each class's
    forms in turn, corners jittered by 1.5 px and stroke widths of 0.6-1.6 px."""
    images = []
    for forms in _FORMS:
        for style in range(SYNTHETIC_STYLES):
            corner = {name: (14 + 6 * x + 1.5 * torch.randn((), generator=g).item(),
                             14 + 10 * y + 1.5 * torch.randn((), generator=g).item())
                      for name, (x, y) in _POINTS.items()}
            form = forms[style % len(forms)]
            strokes = torch.tensor([(*corner[_STROKES[s][0]], *corner[_STROKES[s][1]])
                                    for s in form])
            images.append(_strokes_image(strokes, 0.6 + torch.rand((), generator=g).item()))
    return torch.stack(images)


def _sampling_fields():
    """The fields a sampling grid is made of, [11, 784]: x, y and 1 (for an affine map,
    in grid_sample's [-1, 1] coordinates) and 8 smooth cosine fields (elastic)."""
    lin = (torch.arange(28.0) + 0.5) / 14 - 1
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    smooth = [torch.cos(torch.pi * kx * (x + 1) / 2) * torch.cos(torch.pi * ky * (y + 1) / 2)
              for kx in range(3) for ky in range(3) if kx + ky > 0]
    return torch.stack([x, y, torch.ones_like(x), *smooth]).flatten(1)


def _chunk_generator(seed, split, index):
    """The generator of one chunk of a synthetic split, seeded from (seed, split, chunk), so
    that the first N images of a split are the same whatever its size."""
    key = hashlib.sha256(f"adamx synthetic mnist {seed} {split} {index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def _synthetic_images(n, protos, seed, split, chunk=2048):
    """``n`` labelled images drawn from ``protos``: each a random prototype of its class,
    some with another's strokes laid faintly over it, warped by a random affine map (scale,
    rotation, shear, shift) plus a smooth elastic field, dimmed or brightened, with noise."""
    fields = _sampling_fields()
    images = torch.empty(n, 28, 28, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for index, start in enumerate(range(0, n, chunk)):
        m = chunk  # always a whole chunk (the last one cut), so that prefixes agree
        g = _chunk_generator(seed, split, index)
        label = torch.randint(0, 10, (m,), generator=g)
        img = protos[label * SYNTHETIC_STYLES + torch.randint(0, SYNTHETIC_STYLES, (m,),
                                                               generator=g)]
        over = (torch.rand(m, generator=g) < SYNTHETIC_OVERLAY).nonzero()[:, 0]
        other = torch.randint(0, len(protos), (len(over),), generator=g)
        faint = 0.3 + 0.4 * torch.rand(len(over), 1, 1, generator=g)
        img[over] = torch.maximum(img[over], faint * protos[other])
        rot = SYNTHETIC_ROTATION * torch.randn(m, generator=g)
        shear = SYNTHETIC_SHEAR * torch.randn(m, generator=g)
        sx = 1 + 0.12 * torch.randn(m, generator=g)
        sy = 1 + 0.10 * torch.randn(m, generator=g)
        shift = 0.24 * (torch.rand(m, 2, generator=g) - 0.5)  # up to 1.7 px each way
        cos, sin = torch.cos(rot), torch.sin(rot)
        affine = torch.stack([torch.stack([cos * sx, shear - sin * sy, shift[:, 0]], -1),
                              torch.stack([sin * sx, cos * sy, shift[:, 1]], -1)], 1)
        elastic = SYNTHETIC_ELASTIC * torch.randn(m, 2, len(fields) - 3, generator=g)
        grid = (torch.cat([affine, elastic], 2).view(2 * m, -1) @ fields)
        grid = grid.view(m, 2, 28, 28).permute(0, 2, 3, 1)
        img = torch.nn.functional.grid_sample(img[:, None], grid, mode="bilinear",
                                              padding_mode="zeros", align_corners=False)[:, 0]
        img = img * (0.75 + 0.5 * torch.rand(m, 1, 1, generator=g))
        img = img + SYNTHETIC_NOISE * torch.randn(m, 28, 28, generator=g)
        keep = min(n - start, chunk)
        images[start:start + keep] = (img[:keep].clamp_(0, 1) * 255).round_().to(torch.uint8)
        labels[start:start + keep] = label[:keep]
    return images, labels


def synthetic_mnist(n_train=60000, n_test=10000, seed=0) -> Mnist:
    """An MNIST-shaped stand-in about as hard as MNIST: 28x28 uint8 images of ten
    stroke-drawn digit classes that share most of their strokes, each image a warped
    (affine and elastic), noisy copy of one of its class's prototypes, some with another
    digit's strokes faintly over it. The tutorial's 5-epoch MLP run ends at a train loss
    of MNIST's order (see benchmarks/HISTORY.md), not at zero. Deterministic for a given
    seed, and the first N images of a split are the same whatever its size (so a run limited
    to N images need not make the rest). A few seconds for 70,000 images on 2 cores."""
    protos = _prototypes(torch.Generator().manual_seed(seed))
    train_x, train_y = _synthetic_images(n_train, protos, seed, "train")
    test_x, test_y = _synthetic_images(n_test, protos, seed, "test")
    return Mnist(train_x, train_y, test_x, test_y, source="synthetic",
                 where=f"synthetic_mnist(seed={seed})")


def get_mnist(data_dir=None, *, allow_download=True, allow_synthetic=True, mirrors=MIRRORS,
              checksums=CHECKSUMS, timeout=DOWNLOAD_TIMEOUT_S, log=None,
              synthetic_sizes=(60000, 10000)) -> Mnist:
    """MNIST from ``data_dir`` (see ``resolve_dir``), downloaded there when missing, else
    (when ``allow_synthetic``) a synthetic stand-in of ``synthetic_sizes`` (train, test)
    images, with the reason in ``notes``.

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
    data = synthetic_mnist(*synthetic_sizes)
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
