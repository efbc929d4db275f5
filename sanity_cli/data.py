"""Datasets as plain tensors: images (N, C, H, W) in [0, 1] and labels (N,).

Every loader returns an `ImageData`. Models that are trained here (cnn, mlp) need the
train split; pretrained models only need test images, so the folder-based loaders
(`imagefolder`, `samples`) read test images only, resized to the model's input size.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sanity_cli import plugins
from sanity_cli.errors import SanityError

log = logging.getLogger(__name__)

UNLABELLED = -1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp", ".jpe"}
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class DatasetUnavailable(SanityError):
    """The dataset's files are neither here nor downloadable: a missing input, not a bad setting."""


class UnreadableImage(Exception):
    """Why one image file cannot be read; the folder loader skips the file and says so."""


@dataclass
class ImageData:
    """A dataset held in memory. Images are float32 in [0, 1], shape (N, C, H, W)."""

    name: str
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    train_x: Tensor | None = None
    train_y: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.test_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.test_x.shape[-1]


def geometry(cfg) -> tuple[int, int]:
    """Channels and size of the images of the dataset that `cfg` names, known without
    loading it (folder datasets take the model's size; 224 stands in), but for a
    custom dataset, whose first image says."""
    if cfg.get("kind") == "custom":
        return custom_geometry(cfg)
    if cfg.name == "digits":  # resized to its config's image_size (conf/dataset/digits.yaml)
        return 1, cfg.image_size
    return {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}.get(cfg.name, (3, 224))


def load_dataset(cfg, *, data_dir: str | Path, seed: int, n_images: int,
                 image_size: int | None = None) -> ImageData:
    """Load the dataset that `cfg` (the `dataset` config group) names.

    `image_size` is the model's input size: folder datasets are resized and
    center-cropped to it. `n_images` bounds how many images those loaders read.
    """
    loaders: dict[str, Callable[[], ImageData]] = {
        "digits": lambda: load_digits(cfg.image_size, cfg.test_fraction, seed),  # conf/dataset/digits.yaml
        "mnist": lambda: load_torchvision("MNIST", data_dir),
        "fashion_mnist": lambda: load_torchvision("FashionMNIST", data_dir, cfg.get("system_dir")),
        "cifar10": lambda: load_torchvision("CIFAR10", data_dir),
        "imagefolder": lambda: load_image_folder(cfg.path, image_size or 224, n_images, seed, cfg.get("classes")),
        "samples": lambda: load_samples(image_size or 224),
        "custom": lambda: load_custom(cfg, n_images, seed, image_size),
    }
    kind = cfg.get("kind") or cfg.name
    if kind not in loaders:
        raise SanityError(f"unknown dataset '{kind}'; choose one of: {', '.join(loaders)}")
    return loaders[kind]()


def load_digits(image_size: int, test_fraction: float, seed: int) -> ImageData:
    """scikit-learn's 8x8 digits (values 0..16), bilinearly resized to `image_size`."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    if not 0 < n_test < len(y):
        empty = "test" if n_test == 0 else "training"
        raise SanityError(f"dataset.test_fraction={test_fraction} leaves the {empty} split of the {len(y)} digits "
                          f"empty; choose a fraction between {1 / len(y):.4f} and {1 - 1 / len(y):.4f}, e.g. 0.2")
    test, train = order[:n_test], order[n_test:]
    return ImageData("digits", x[test].clamp(0, 1), y[test], [str(i) for i in range(10)],
                     x[train].clamp(0, 1), y[train])


def load_torchvision(kind: str, data_dir: str | Path, system_dir: str | None = None) -> ImageData:
    """MNIST, FashionMNIST or CIFAR10 through torchvision, both splits.

    A system copy of the raw IDX files (Debian's dataset-fashion-mnist) is unpacked
    into `data_dir` first; otherwise torchvision downloads, and a failed download
    becomes an error that says where to put the files.
    """
    import torchvision.datasets as tvd

    root = Path(data_dir).expanduser()
    if system_dir and Path(system_dir).is_dir():
        _unpack_idx(Path(system_dir), root / kind / "raw")
    dataset_cls = getattr(tvd, kind)
    try:
        train = dataset_cls(str(root), train=True, download=True)
        test = dataset_cls(str(root), train=False, download=True)
    except Exception as error:  # noqa: BLE001 - any download failure means the same to the user
        raw = root / kind / "raw"
        if raw.is_dir() and any(raw.iterdir()):  # files there, yet unreadable
            raise SanityError(f"the {kind} files in {raw} cannot be read ({type(error).__name__}: they are damaged, "
                              f"cut short or incomplete); move them away (mv {raw} {raw}.damaged) to download them "
                              "again, or put whole copies there") from None
        debian = (f", or install Debian's dataset-fashion-mnist package (its files in {system_dir} are read when "
                  "present)" if kind == "FashionMNIST" else "")
        raise DatasetUnavailable(
            f"cannot load {kind} from {root} and cannot download it ({type(error).__name__}); "
            f"put the dataset's files in {raw} (torchvision's layout) or set data_dir=PATH{debian}"
        ) from None
    (train_x, train_y), (test_x, test_y) = _to_tensors(train), _to_tensors(test)
    return ImageData(kind.lower(), test_x, test_y, list(train.classes), train_x, train_y)


def _unpack_idx(source: Path, raw_dir: Path) -> None:
    """Decompress *-ubyte.gz files into torchvision's raw folder, once."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for packed in source.glob("*-ubyte.gz"):
        target = raw_dir / packed.stem
        if not target.exists():
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _to_tensors(dataset) -> tuple[Tensor, Tensor]:
    data = torch.as_tensor(np.asarray(dataset.data))
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return x.float().div(255.0), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)


def load_image_folder(path: str, image_size: int, n_images: int, seed: int, use_classes=None) -> ImageData:
    """Test images from a folder of class sub-folders, balanced across classes.

    use_classes: None for all classes, a number of classes picked at random (seeded),
    or a list of sub-folder names (the paper explained 10 classes x 20 images).
    Labels are indices into the sorted sub-folder names, as an ImageNet model expects.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SanityError(f"dataset folder '{root}' does not exist; set dataset.path to a folder of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = {c: sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    classes = [c for c in classes if files[c]]
    if not classes:
        raise SanityError(f"dataset folder '{root}' has no class sub-folders with images; "
                          "expected ROOT/CLASS/IMAGE.jpg")
    rng = np.random.default_rng(seed)
    if isinstance(use_classes, int):
        use = sorted(rng.choice(len(classes), size=min(use_classes, len(classes)), replace=False).tolist())
    else:
        use = range(len(classes)) if use_classes is None else [_class_index(classes, c) for c in use_classes]
    order = _balanced([[(f, i) for f in rng.permutation(files[classes[i]])] for i in use],
                      sum(len(files[classes[i]]) for i in use))
    images, labels = _read_images(order, n_images, image_size, root)
    return ImageData("imagefolder", images, labels, classes)


def _read_images(candidates: list[tuple[Path, int]], n: int, image_size: int,
                 root: Path) -> tuple[Tensor, Tensor]:
    """The first `n` readable images of `candidates` (path, label) as (n, 3, S, S), and
    their labels (n,). A file that is no readable image is skipped with a warning that
    names it, and the next candidate taken in its place."""
    images, labels, skipped = [], [], 0
    for path, label in candidates:
        if len(images) == n:
            break
        try:
            images.append(read_image(path, image_size))
        except UnreadableImage as why:
            log.warning("skipping %s: %s", path, why)
            skipped += 1
            continue
        labels.append(label)
    if skipped:
        log.warning("skipped %d unreadable image file%s in %s (named above)", skipped, "" if skipped == 1 else "s",
                    root)
    if not images:
        raise SanityError(f"dataset folder '{root}' has no readable image (all {skipped} tried were not); "
                          "see the warnings above for why")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _class_index(classes: list[str], name) -> int:
    if str(name) not in classes:
        raise SanityError(f"no class folder '{name}' in the dataset; dataset.classes takes sub-folder names")
    return classes.index(str(name))


def load_samples(image_size: int) -> ImageData:
    """scikit-image's bundled photos as RGB images; they carry no ImageNet labels."""
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)()) for name in SAMPLE_PHOTOS]
    images = torch.stack([_fit(_hwc_to_tensor(p), image_size) for p in photos])
    labels = torch.full((len(photos),), UNLABELLED, dtype=torch.long)
    return ImageData("samples", images, labels, list(SAMPLE_PHOTOS))


def _balanced(per_class: list[list], n: int) -> list:
    """Round-robin over classes so `n` items cover as many classes as possible."""
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(items) for items in per_class):
        chosen += [items[depth] for items in per_class if depth < len(items)]
        depth += 1
    return chosen[:n]


def read_image(path: Path, image_size: int) -> Tensor:
    """One image file as (3, S, S) in [0, 1], S = image_size; UnreadableImage saying why
    when the file is not a whole image (empty, truncated, another kind of file, too many
    pixels to be safe to decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_regular_file(path) as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                image.load()
                pixels = _unit_pixels(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"too many pixels to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file (empty, or of a kind PIL cannot read)") from None
    except FileNotFoundError:
        raise UnreadableImage("it does not exist (a symbolic link to nowhere?)") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or damaged image data
        raise UnreadableImage(f"damaged image data ({error})") from None
    return _fit(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), image_size)


def _open_regular_file(path: Path):
    """`path` opened for reading; UnreadableImage unless it is a regular file. Opened
    without blocking, so a FIFO with an image's name cannot hang the run."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise UnreadableImage(f"{kind}, not an image file")
    return os.fdopen(descriptor, "rb")


def _unit_pixels(image, path: Path) -> np.ndarray:
    """A PIL image's pixels as float32 (H, W, 3) in [0, 1]: 8-bit modes over 255, 16-bit
    ones over 65535, float ones as they are (stretched from their min..max when they
    leave [0, 1]), so that no bit depth is clipped to white or rounded to black."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        full = 65535.0 if values.max(initial=0) <= 65535 else float(2**31 - 1)  # "I": 16-bit PNGs, or 32-bit
        gray = np.clip(values / full, 0.0, 1.0)
    elif image.mode == "F":
        gray = np.asarray(image).astype(np.float64)
        if not np.isfinite(gray).all():
            raise UnreadableImage("float pixels that are NaN or infinite")
        low, high = gray.min(), gray.max()
        if low < 0 or high > 1:
            log.warning("%s: float pixels in [%.4g, %.4g], outside [0, 1]: stretched to [0, 1]", path, low, high)
            gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    else:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def _hwc_to_tensor(array: np.ndarray) -> Tensor:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.as_tensor(array[..., :3].copy()).permute(2, 0, 1).float().div(255.0)


def _fit(image: Tensor, size: int) -> Tensor:
    """Resize the shorter side to `size` (antialiased) and center-crop to size x size. (C, H, W)."""
    _, h, w = image.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def adapt_images(x: Tensor, channels: int, size: int) -> Tensor:
    """Match a batch (N, C, H, W) in [0, 1] to a model's channels and square input size."""
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).contiguous()


def select_images(labels: Tensor, n: int, seed: int) -> Tensor:
    """Indices of `n` test images, seeded and balanced across classes; all of them, with
    a warning, when the test split holds fewer than `n`."""
    if n > len(labels):
        log.warning("n_images=%d, but the test split holds %d images: explaining those %d", n, len(labels),
                    len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_class = [order[labels[order] == c].tolist() for c in labels.unique().tolist()]
    return torch.tensor(_balanced(per_class, min(n, len(labels))), dtype=torch.long)


def load_custom(cfg, n_images: int, seed: int, image_size: int | None) -> ImageData:
    """A user's own dataset (`dataset=custom`): the map-style torch Dataset of (image,
    label) pairs that `dataset._target_` returns, and the optional training split that
    `dataset.train_split._target_` returns.

    Of the test split only `n_images` items are read: balanced across classes where
    the dataset lists its labels in `targets` (as torchvision's do), else a seeded
    random choice. The training split is read whole. Images may be tensors (C, H, W)
    or (H, W) in [0, 1] (or uint8), PIL images, or arrays (H, W[, C]); images of other
    sizes than `image_size` x `image_size` are resized and center-cropped to it.
    """
    test = plugins.build_dataset(cfg, "dataset")
    test_x, test_y = _read_items(test, _test_indices(test, n_images, seed), image_size, "dataset")
    train_x = train_y = None
    if cfg.get("train_split"):
        train = plugins.build_dataset(cfg.train_split, "dataset.train_split")
        train_x, train_y = _read_items(train, range(len(train)), image_size, "dataset.train_split")
    return ImageData(cfg.name, test_x, test_y, _class_names(test, test_y, train_y), train_x, train_y)


def custom_geometry(cfg) -> tuple[int, int]:
    """Channels and (shorter) side of the first image of a custom dataset."""
    dataset = plugins.build_dataset(cfg, "dataset")
    if len(dataset) == 0:
        raise SanityError(f"dataset._target_ '{cfg._target_}' returned an empty dataset; give one with images")
    image = _item_image(_item(dataset, 0, "dataset")[0], 0, "dataset")
    return image.shape[0], min(image.shape[1:])


def _test_indices(dataset, n: int, seed: int) -> list[int]:
    if len(dataset) == 0:
        raise SanityError("dataset._target_ returned an empty dataset; give one with images")
    targets = getattr(dataset, "targets", None)
    try:
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.long) if targets is not None else None
    except (TypeError, ValueError):  # targets that are not class numbers say nothing about balance
        labels = None
    if labels is not None and labels.dim() == 1 and len(labels) == len(dataset):
        chosen = select_images(labels, n, seed)
    else:
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(chosen.tolist())


def _item(dataset, index: int, setting: str) -> tuple:
    try:
        item = dataset[index]
    except Exception as error:  # noqa: BLE001 - the user's dataset code may fail in any way
        raise SanityError(f"{setting}: reading item {index} failed ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:160]})") from None
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise SanityError(f"{setting}: item {index} is a {type(item).__name__}, not an (image, label) pair; "
                          "make the dataset return (image, label)")
    return item


def _read_items(dataset, indices, image_size: int | None, setting: str) -> tuple[Tensor, Tensor]:
    """The images (N, C, S, S) in [0, 1] and labels (N,) of the items at `indices`."""
    images, labels = [], []
    for index in indices:
        image, label = _item(dataset, index, setting)[:2]
        images.append(_item_image(image, index, setting))
        labels.append(_item_label(label, index, setting))
    return _same_size(images, image_size), torch.tensor(labels, dtype=torch.long)


def _item_image(image, index: int, setting: str) -> Tensor:
    """One image as float (C, H, W) in [0, 1], C = 1 or 3."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    if isinstance(image, np.ndarray):  # arrays and PIL images are (H, W[, C])
        image = torch.from_numpy(image.copy())
        image = image.permute(2, 0, 1) if image.dim() == 3 else image
    if not isinstance(image, Tensor):
        raise SanityError(f"{setting}: the image of item {index} is a {type(image).__name__}; give a tensor "
                          "(C, H, W), a PIL image or an array (e.g. add transform=ToTensor())")
    image = image[None] if image.dim() == 2 else image
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise SanityError(f"{setting}: the image of item {index} has shape {tuple(image.shape)}; "
                          "give (C, H, W) with 1 or 3 channels")
    if image.dtype == torch.uint8:
        return image.float().div(255.0)
    if not image.is_floating_point():
        raise SanityError(f"{setting}: the image of item {index} is {image.dtype}; give float in [0, 1] or uint8")
    if not bool(torch.isfinite(image).all()):
        raise SanityError(f"{setting}: the image of item {index} holds NaN or infinite values; fix the dataset "
                          "(every pixel must be a number in [0, 1])")
    low, high = image.min().item(), image.max().item()
    if low < -1e-4 or high > 1 + 1e-4:  # e.g. a Normalize transform: the model's settings normalize
        raise SanityError(f"{setting}: the image of item {index} has values in [{low:.3g}, {high:.3g}], not in "
                          "[0, 1]; drop a Normalize transform and set model.mean and model.std instead")
    return image.float().clamp(0, 1)


def _item_label(label, index: int, setting: str) -> int:
    if label is None:
        return UNLABELLED
    if isinstance(label, Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and label >= UNLABELLED:
        return int(label)
    raise SanityError(f"{setting}: the label of item {index} is {label!r}; give a class number (0, 1, ...)")


def _same_size(images: list[Tensor], size: int | None) -> Tensor:
    """Stack (C, H, W) images; unequal or non-square ones are resized and center-cropped
    to `size` (default: the first image's shorter side), gray ones repeated to RGB
    where the others are in colour."""
    channels = max(image.shape[0] for image in images)
    images = [image.expand(channels, -1, -1) for image in images]
    first = images[0].shape
    if first[1] == first[2] and all(image.shape == first for image in images) and size in (None, first[1]):
        return torch.stack(images)
    size = size or min(first[1:])
    return torch.stack([_fit(image, size) for image in images])


def _class_names(dataset, *labels: Tensor | None) -> list[str]:
    """The dataset's own `classes` where it has them for every label, else '0', '1', ..."""
    count = max([int(y.max()) + 1 for y in labels if y is not None and len(y)] + [0])
    names = getattr(dataset, "classes", None)
    if isinstance(names, (list, tuple)) and len(names) >= count:
        return [str(name) for name in names]
    return [str(i) for i in range(count)]
