"""Datasets held in memory as uint8 image tensors: scikit-learn's 8x8 digits, CIFAR-10, a
generated `synthetic` set of any size for scale tests, and `folder`: a user's own images, one
sub-folder per class (the ImageFolder layout).

Every loader returns a `Dataset` whose images are uint8 (N, C, H, W); normalisation and
augmentation happen per batch (see `cadfl.data.augment`), so a whole dataset stays small
(CIFAR-10 train is 150 MB as uint8, 600 MB as float32).
"""

import hashlib
import importlib.util
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_BATCH_SIZE = 10_000
CIFAR10_ROW = 3 * 32 * 32
DEFAULT_DATA_DIR = Path("~/.cache/cadfl")

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DataError(Exception):
    """A user-facing data problem (missing/malformed files, impossible request).

    The message says what was wrong and what to do about it.
    """


@dataclass
class Dataset:
    """An image classification dataset held in memory.

    Images are uint8 (N, C, H, W), contiguous; labels are int64 (N,). `mean`/`std` are the
    per-channel statistics of `train_x / 255`, used by `augment.to_float`. `crop_padding`
    and `flip` are the dataset's default training augmentation. `owners`, when set, is the
    device each training image belongs to: a dataset that comes split by its devices (the
    nodes' own data), which the engine keeps as it is instead of partitioning it.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    owners: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes; labels are 0..num_classes-1."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 (N, C, H, W) tensor scaled to [0, 1].

    Computed from a 256-bin histogram per channel, which is exact and avoids a float copy
    of the whole dataset.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        p = hist / hist.sum()
        mean = float((p * values).sum())
        var = float((p * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


def _make_dataset(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, classes: list[str], crop_padding: int,
                  flip: bool) -> Dataset:
    tx = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.uint8))
    mean, std = channel_stats(tx)
    return Dataset(
        name=name,
        train_x=tx,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.uint8)),
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        classes=classes,
        mean=mean,
        std=std,
        crop_padding=crop_padding,
        flip=flip,
    )


def load_digits(data_dir: str | Path | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

    Pixels 0..16 are scaled to uint8 0..255. The train/test split is stratified (20% of each
    class goes to test) and fixed, so every call returns the same tensors. `data_dir` is
    accepted for a uniform loader signature and ignored.
    """
    # The file sklearn.datasets.load_digits reads, read without importing sklearn.datasets
    # (0.6 s): a Flower node loads its data in a fresh process for every message.
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    table = np.loadtxt(Path(package) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    x = np.rint(table[:, :-1].reshape(-1, 1, 8, 8) * (255 / 16)).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: round(len(idx) * DIGITS_TEST_FRACTION)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return _make_dataset("digits", x[~is_test], y[~is_test], x[is_test], y[is_test],
                         [str(c) for c in range(10)], crop_padding=1, flip=False)


def cifar10_root(data_dir: str | Path | None = None) -> Path:
    """The directory expected to contain `cifar-10-batches-py`.

    Resolution order: `data_dir` if given, else the `CADFL_DATA` environment variable, else
    `~/.cache/cadfl`.
    """
    if data_dir is None:
        data_dir = os.environ.get("CADFL_DATA") or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser().absolute()


def _missing_message(folder: Path, reason: str) -> str:
    return (
        f"CIFAR-10 not found: looked for the folder {folder} ({reason}). "
        f"Either download {CIFAR10_URL} by hand and extract it into {folder.parent} "
        f"(`tar xzf cifar-10-python.tar.gz -C {folder.parent}` creates {CIFAR10_FOLDER}), "
        f"or point to an existing copy with --data-dir DIR or CADFL_DATA=DIR, "
        f"where DIR contains {CIFAR10_FOLDER}."
    )


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into the file `dest` with a progress bar (the only network access)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc="cifar-10") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fetch_cifar10(root: Path) -> None:
    """Download, verify and extract CIFAR-10 so that `root / CIFAR10_FOLDER` exists.

    Everything is written to temporary names inside `root` and moved into place with one
    rename at the end, so a failure never leaves a half-written dataset behind.
    """
    folder = root / CIFAR10_FOLDER
    # The outermost directory this call creates, removed again if the download fails.
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, archive = tempfile.mkstemp(dir=root, prefix=".cifar-10-python.", suffix=".part")
        os.close(fd)
        try:
            _download(CIFAR10_URL, Path(archive))
            md5 = _md5(Path(archive))
            if md5 != CIFAR10_MD5:
                raise DataError(f"downloaded archive has MD5 {md5}, expected {CIFAR10_MD5}")
            with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-10-extract.") as tmp:
                # The MD5 matched the official archive; the "data" filter (Python >= 3.11.4,
                # 3.10.12) additionally refuses absolute paths and links where available.
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(tmp, **safe)
                try:
                    os.replace(Path(tmp) / CIFAR10_FOLDER, folder)
                except OSError:
                    # Another process may have finished the same download first.
                    if not folder.is_dir():
                        raise
        finally:
            os.unlink(archive)
    except (OSError, urllib.error.URLError, tarfile.TarError, DataError) as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(_missing_message(folder, f"automatic download failed: {e}")) from e


def _read_pickle(path: Path) -> dict:
    """Unpickle one CIFAR-10 batch file.

    Loading pickle executes code from the file; this is the single documented exception to
    "never load pickle" in cadfl and only ever reads the official CIFAR-10 files from the
    configured data directory (see `cifar10_root`).
    """
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling garbage can raise almost anything
        raise DataError(f"{path} is not a readable CIFAR-10 pickle ({e!r}); "
                        f"delete {path.parent} and download it again") from e
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, expected a dict")
    return d


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    data, labels = d.get(b"data"), d.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.shape == (CIFAR10_BATCH_SIZE, CIFAR10_ROW)):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else repr(type(data))
        raise DataError(f"{path}: b'data' should be a uint8 array of shape "
                        f"({CIFAR10_BATCH_SIZE}, {CIFAR10_ROW}), got {got}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        y = np.zeros(0, dtype=np.int64)
    if y.shape != (CIFAR10_BATCH_SIZE,) or y.min() < 0 or y.max() >= len(CIFAR10_CLASSES):
        got = f"{len(y)} values" + (f" in {y.min()}..{y.max()}" if len(y) else "")
        raise DataError(f"{path}: b'labels' should be {CIFAR10_BATCH_SIZE} ints in 0..9, "
                        f"got {got}")
    return data.reshape(-1, 3, 32, 32), y


def load_cifar10(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 from the `cifar-10-batches-py` folder inside `cifar10_root(data_dir)`.

    If the folder is missing and `download` is true, the official archive is downloaded,
    MD5-checked and extracted there first. Raises DataError (saying where the files were
    looked for and how to provide them) when the folder is missing or malformed.
    """
    root = cifar10_root(data_dir)
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        if not download:
            raise DataError(_missing_message(folder, "download disabled"))
        _fetch_cifar10(root)

    files = [CIFAR10_META_FILE, *CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: {', '.join(missing)} missing; it must hold "
                        f"{', '.join(files)} from {CIFAR10_URL}")
    meta_path = folder / CIFAR10_META_FILE
    names = _read_pickle(meta_path).get(b"label_names")
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise DataError(f"{meta_path}: b'label_names' should list {len(CIFAR10_CLASSES)} "
                        f"class names")
    train = [_read_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_x, test_y = _read_batch(folder / CIFAR10_TEST_FILE)
    return _make_dataset(
        "cifar10",
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        test_x,
        test_y,
        [n.decode() if isinstance(n, bytes) else str(n) for n in names],
        crop_padding=4,
        flip=True,
    )


def load_synthetic(data_dir: str | Path | None = None, *, images: int = 200_000,
                   test_images: int = 2_000, classes: int = 10, channels: int = 1,
                   size: int = 8, seed: int = 0) -> Dataset:
    """A seeded, generated dataset of any size, for scale tests (no files, no download).

    Every class has a random prototype image; a sample is its class's prototype plus noise,
    clipped to uint8, so the classes can be learnt. Labels cycle through the classes, so every
    class has the same number of images (within one). `data_dir` is ignored. The default,
    200,000 images of 1x8x8 in 10 classes (12.8 MB), is enough for 10,000 devices of the
    default partition (5 classes each, 20 images per device) and fits `digits_cnn`.
    """
    if min(images, test_images, classes, channels, size) < 1:
        raise DataError("synthetic: images, test_images, classes, channels and size must all "
                        "be >= 1")
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(classes, channels, size, size, generator=gen) * 255

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.arange(n) % classes
        noise = torch.randn(n, channels, size, size, generator=gen) * 48
        x = (prototypes[y] + noise).clamp_(0, 255).round_().to(torch.uint8)
        return x.numpy(), y.numpy()

    train, test = draw(images), draw(test_images)
    return _make_dataset("synthetic", *train, *test, [str(c) for c in range(classes)],
                         crop_padding=1 if size >= 8 else 0, flip=False)


FOLDER_SPLIT_SEED = 0


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One image file as a uint8 (C, size, size) array in PIL `mode` ("L" or "RGB")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"folder dataset: {path} is not a readable image ({e})") from e
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_folder(data_dir: str | Path | None = None, *, size: int = 32, channels: int = 3,
                test_fraction: float = 0.2, seed: int = FOLDER_SPLIT_SEED) -> Dataset:
    """A user's own images: `data_dir` holds one sub-folder per class (its name is the class
    name), the images inside (any format PIL reads; hidden files are skipped).

    Images are converted to RGB (`channels` 3) or grayscale (1) and resized to size x size.
    Classes are sorted by name; `test_fraction` of every class's images (rounded, drawn with
    `seed`) is held out as the test split. Raises DataError for a missing folder, a folder
    without class sub-folders, an empty class folder or an unreadable image.
    """
    if data_dir is None:
        raise DataError("folder dataset: give the folder of images (data_dir = DIR, one "
                        "sub-folder per class)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"folder dataset: {root} is not a folder (expected one sub-folder of "
                        "images per class)")
    if channels not in (1, 3) or size < 1 or not 0 <= test_fraction < 1:
        raise DataError("folder dataset: channels must be 1 or 3, size >= 1 and "
                        f"test_fraction in [0, 1); got {channels}, {size}, {test_fraction}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"folder dataset: {root} has no class sub-folders")
    mode = "L" if channels == 1 else "RGB"
    rng = np.random.default_rng(seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"folder dataset: class folder {root / name} has no images")
        images = np.stack([_read_image(p, mode, size) for p in files])
        order = rng.permutation(len(images))
        # Rounded half up, and at least one training image per class.
        held = np.sort(order[: min(len(images) - 1,
                                   math.floor(len(images) * test_fraction + 0.5))])
        is_test = np.zeros(len(images), dtype=bool)
        is_test[held] = True
        train_x.append(images[~is_test])
        test_x.append(images[is_test])
        train_y += [c] * int((~is_test).sum())
        test_y += [c] * int(is_test.sum())
    # Crop padding in proportion to the size (CIFAR-10's 4 at 32, the digits' 1 at 8); no
    # flips: they would change the class of digits or text.
    return _make_dataset("folder", np.concatenate(train_x), np.array(train_y),
                         np.concatenate(test_x), np.array(test_y), classes,
                         crop_padding=size // 8, flip=False)


DATASETS: dict[str, Callable[..., Dataset]] = {"cifar10": load_cifar10, "digits": load_digits,
                                               "folder": load_folder,
                                               "synthetic": load_synthetic}


def load_dataset(name: str, data_dir: str | Path | None = None, **options) -> Dataset:
    """Load a dataset by name (one of `DATASETS`); `data_dir` is where CIFAR-10 or the
    `folder` images live; `options` go to the loader (`[synthetic]`, `[folder]`)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir, **options)
