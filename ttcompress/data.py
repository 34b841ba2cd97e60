"""Image data sets: loading, validation, batching, training augmentation and the CIFAR-10-C release.

Every set is held as an :class:`ImageSet` of ``uint8`` images in ``(N, C, H, W)`` layout.  Models receive float
images in ``[0, 1]`` (``images / 255``); normalisation is the model's business.

Sources understood by :func:`load_split`:

* ``cifar10`` / ``cifar100`` -- torchvision's copies under ``data_root`` (downloaded when possible);
* a ``.npz`` file with ``train_x``/``train_y`` [+ ``test_x``/``test_y``] or ``x``/``y`` arrays, optional ``classes``;
* an ImageFolder directory, either ``ROOT/{train,test|val}/CLASS/*.png`` or ``ROOT/CLASS/*.png``.

Every problem a user can cause raises :class:`~ttcompress.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "ImageSet",
    "TrainLoader",
    "load_split",
    "check_compatible",
    "train_loader",
    "load_cifar_c",
    "DEFAULT_DATA_ROOT",
    "SPLITS",
]

DEFAULT_DATA_ROOT = "~/.cache/ttcompress/data"
SPLITS = ("train", "test")
_TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------------------------
# ImageSet
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A labelled set of images.

    ``images`` is ``uint8`` ``(N, C, H, W)``, ``labels`` is ``int64`` ``(N,)``; ``classes`` names the classes when the
    source does; ``source`` says where the set came from (for messages and reports).
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    classes: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, n: int | None) -> "ImageSet":
        """The first ``n`` images (all of them when ``n`` is ``None`` or not smaller than the set)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"cannot take the first {n} images of {self.source or 'the data'}; pass a positive number")
        return ImageSet(
            images=self.images[:n],
            labels=self.labels[:n],
            num_classes=self.num_classes,
            classes=self.classes,
            source=self.source,
        )

    def batches(
        self, batch_size: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(float images in [0, 1], int64 labels)`` on ``device``, in order."""
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            x = self.images[start : start + batch_size].to(device).float().div_(255.0)
            y = self.labels[start : start + batch_size].to(device)
            yield x, y

    def float_images(self) -> torch.Tensor:
        """All images as one float tensor in ``[0, 1]`` (CPU)."""
        return self.images.float().div_(255.0)


def _make_imageset(images: np.ndarray, labels: np.ndarray, classes: list[str] | None, source: str) -> ImageSet:
    """Validate already-decoded arrays and build an ImageSet.  ``images`` may be NHWC or NCHW, uint8 or float."""
    images = _images_to_uint8_nchw(images, source)
    labels = _check_labels(labels, source)
    if len(labels) != len(images):
        raise DataError(
            f"{source}: {len(images)} images but {len(labels)} labels; images and labels must have the same length"
        )
    if classes is not None:
        num_classes = len(classes)
        if num_classes == 0:
            raise DataError(f"{source}: the class list is empty; remove it or list the class names")
    else:
        num_classes = int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise DataError(
            f"{source}: label {int(labels.max())} is out of range for {num_classes} classes; "
            "labels must be 0..num_classes-1"
        )
    return ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64, copy=False)),
        num_classes=num_classes,
        classes=classes,
        source=source,
    )


def _images_to_uint8_nchw(x: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise DataError(
            f"{source}: images have shape {tuple(x.shape)}; expected 4-D (N,H,W,C) or (N,C,H,W) "
            "(add a channel axis for grayscale)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{source}: the image set is empty")
    if x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3):
        raise DataError(
            f"{source}: images have shape {tuple(x.shape)}; the channel axis (first after N, or last) must have "
            "size 1 or 3"
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise DataError(f"{source}: images have shape {tuple(x.shape)}; height and width must be positive")
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{source}: images have dtype {x.dtype}; store uint8 in 0..255 or floats in [0, 1]")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images range over {lo}..{hi}; they must lie in 0..255")
        return x.astype(np.uint8)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{source}: float images range over [{lo:g}, {hi:g}]; they must lie in [0, 1] (or store uint8 0..255)"
        )
    return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)


def _check_labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels have shape {tuple(y.shape)}; expected a 1-D array of class indices")
    if y.size == 0:
        raise DataError(f"{source}: the label array is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DataError(f"{source}: labels have dtype {y.dtype}; they must be integer class indices (e.g. int64)")
    if int(y.min()) < 0:
        raise DataError(f"{source}: found negative label {int(y.min())}; labels must be 0..num_classes-1")
    return y.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# load_split
# ----------------------------------------------------------------------------------------------------------------


def load_split(spec: str, split: str = "test", data_root: str | None = None, download: bool = True) -> ImageSet:
    """Load one split of a data set.

    ``spec`` is ``cifar10``, ``cifar100``, a path to an ``.npz`` file, or an ImageFolder directory (see module doc).
    ``split`` is ``train`` or ``test`` (``val`` is accepted for ``test``).
    """
    split = str(split).lower()
    if split == "val":
        split = "test"
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    key = str(spec).strip().lower()
    if key in _TORCHVISION_SETS:
        return _load_torchvision(key, split, data_root, download)
    path = Path(os.path.expanduser(str(spec)))
    if not path.exists():
        raise DataError(
            f"data set {spec!r} not found: give cifar10, cifar100, an existing .npz file or an image folder"
        )
    if path.is_dir():
        return _load_image_folder(path, split)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, split)
    raise DataError(f"{spec}: unsupported data file; use an .npz file, an image folder, cifar10 or cifar100")


def _load_torchvision(name: str, split: str, data_root: str | None, download: bool) -> ImageSet:
    import torchvision.datasets as tvd

    root = Path(os.path.expanduser(data_root or DEFAULT_DATA_ROOT))
    cls = getattr(tvd, _TORCHVISION_SETS[name])
    hint = (
        f"pass --data-root with the extracted {name} dataset (the folder holding "
        f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}) or use an .npz file"
    )
    try:
        if download:
            root.mkdir(parents=True, exist_ok=True)
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except DataError:
        raise
    except Exception as exc:  # network errors, corrupt archives, missing files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        verb = "could not download or read" if download else "could not read"
        raise DataError(f"{verb} {name} under {root} ({reason}); {hint}") from None
    return _make_imageset(
        np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes), f"{name}:{split}"
    )


def _load_npz(path: Path, split: str) -> ImageSet:
    source = f"{path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"x", "y"} <= keys:
                xk, yk = "x", "y"
            elif {f"{split}_x", f"{split}_y"} <= keys:
                xk, yk = f"{split}_x", f"{split}_y"
            elif split == "test" and {"train_x", "train_y"} <= keys:
                raise DataError(f"{path} has no test_x/test_y arrays; add them or evaluate with split 'train'")
            else:
                raise DataError(
                    f"{path} has arrays {sorted(keys)}; expected x/y or {split}_x/{split}_y"
                )
            x = z[xk]
            y = z[yk]
            classes = None
            if "classes" in keys:
                c = z["classes"]
                if c.ndim != 1:
                    raise DataError(f"{path}: 'classes' must be a 1-D array of class names")
                classes = [str(v) for v in c.tolist()]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path} as an .npz archive ({reason}); save it with numpy.savez") from None
    if xk != "x":
        source = f"{path}:{split}"
    return _make_imageset(x, y, classes, source)


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS and not any(
            part.startswith(".") for part in p.relative_to(folder).parts
        )
    )


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


MAX_IMAGE_PIXELS = 2**25  # one image of an ImageFolder: 5792×5792; a classifier's inputs are far smaller


def _load_image_folder(root: Path, split: str) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    subdirs = set(_class_dirs(root))
    split_dirs = {"train", "test", "val"} & subdirs
    if split_dirs:
        if split == "train":
            chosen = root / "train" if "train" in subdirs else None
        else:
            chosen = root / "test" if "test" in subdirs else (root / "val" if "val" in subdirs else None)
        if chosen is None:
            want = "train/" if split == "train" else "test/ (or val/)"
            raise DataError(f"{root} has split folders {sorted(split_dirs)} but no {want}; add it or pick another split")
        # the class list is shared by every split so that indices agree between train and test
        classes = sorted(set().union(*(_class_dirs(root / d) for d in split_dirs)))
        source = f"{root}:{split}"
    else:
        chosen = root
        classes = sorted(subdirs)
        source = str(root)
    if not classes:
        raise DataError(f"{chosen} has no class folders; expected {chosen}/CLASS_NAME/image.png")

    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        folder = chosen / name
        if folder.is_dir():
            files.extend((p, index) for p in _list_images(folder))
    if not files:
        raise DataError(f"{chosen} contains no images ({', '.join(_IMAGE_EXTENSIONS)}) in its class folders")

    arrays: list[np.ndarray] = []
    gray = True
    for p, _ in files:
        try:
            with Image.open(p) as im:
                width, height = im.size  # from the header: refuse a decompression bomb before decoding it
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(f"image {p} claims {width}×{height} pixels (more than {MAX_IMAGE_PIXELS:,}); "
                                    "refusing to decode it")
                im.load()
                if im.mode in ("1", "L", "I", "I;16", "F", "LA"):
                    arr = np.asarray(im.convert("L"))[..., None]
                else:
                    arr = np.asarray(im.convert("RGB"))
                    gray = False
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image {p} ({type(exc).__name__}); fix or remove it") from None
        arrays.append(arr)

    sizes = Counter((a.shape[1], a.shape[0]) for a in arrays)
    if len(sizes) > 1:
        example = {}
        for (p, _), a in zip(files, arrays):
            example.setdefault((a.shape[1], a.shape[0]), p.relative_to(chosen))
        desc = ", ".join(f"{w}x{h} ({count} files, e.g. {example[(w, h)]})" for (w, h), count in sizes.most_common())
        raise DataError(f"{chosen}: images differ in size: {desc}; resize them to one size first")
    if not gray:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    images = np.stack(arrays)  # NHWC
    labels = np.array([index for _, index in files], dtype=np.int64)
    return _make_imageset(images, labels, classes, source)


# ----------------------------------------------------------------------------------------------------------------
# Model compatibility
# ----------------------------------------------------------------------------------------------------------------


def check_compatible(images: ImageSet, model: torch.nn.Module, device: str | torch.device = "cpu") -> int:
    """Run the model on one image; raise DataError when it cannot classify this data.  Returns the logits width."""
    if len(images) == 0:
        raise DataError(f"{images.source or 'the data'} is empty")
    c, h, w = images.image_shape
    x = images.images[:1].to(device).float().div_(255.0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(x)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > 200:
            first = first[:200] + "..."
        raise DataError(
            f"the model cannot take the {c}x{h}x{w} images of {images.source or 'the data'} ({first}); "
            "use data with the channel count and size the model was built for"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model returned {shape} for one image; expected logits of shape (1, num_classes)")
    width = int(out.shape[1])
    needed = int(images.labels.max()) + 1
    if width < needed:
        raise DataError(
            f"the model has {width} outputs but {images.source or 'the data'} has labels up to {needed - 1}; "
            "use a model built for this data set"
        )
    if images.classes is not None and width != images.num_classes:
        raise DataError(
            f"the model has {width} outputs but {images.source or 'the data'} has {images.num_classes} classes; "
            "use a model built for this data set"
        )
    return width


# ----------------------------------------------------------------------------------------------------------------
# Training loader
# ----------------------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool = True
) -> torch.Tensor:
    """Random crop (zero padding ``padding`` on every side, crop back to the input size) and random horizontal flip.

    Vectorised over the batch.  ``x`` is ``(B, C, H, W)`` of any dtype on any device; the random draws come from the
    CPU ``generator`` so the result does not depend on the device.
    """
    b, c, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
        cols = ox[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        x = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class TrainLoader:
    """Shuffled, augmented mini-batches of an :class:`ImageSet` for training, deterministic given ``(seed, epoch)``.

    * Each epoch draws one permutation from ``(seed, epoch)``; under DDP every rank draws the same permutation and
      takes its own contiguous slice of ``len // world_size`` indices, so ranks are disjoint and equal-sized (up to
      ``world_size - 1`` images, different ones each epoch, are left out).
    * Augmentation (when ``augment``): random crop with ``padding`` zero pixels on each side (default ``H // 8``,
      i.e. 4 for 32x32 images as in the paper) and a random horizontal flip, drawn from ``(seed, epoch, rank)``.
    * Yields ``(float images in [0, 1] on device, int64 labels on device)``.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        augment: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        padding: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"invalid rank {rank} for world size {world_size}")
        n = len(images)
        if n == 0:
            raise DataError(f"{images.source or 'the training set'} is empty")
        self.images = images
        self.batch_size = int(batch_size)
        self.augment = augment
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        _, h, w = images.image_shape
        self.padding = max(1, min(h, w) // 8) if padding is None else int(padding)
        self.per_rank = n // self.world_size
        self.epoch = 0
        if self.per_rank == 0 or len(self) == 0:
            raise DataError(
                f"{images.source or 'the training set'} has {n} images, too few for batch size {batch_size}"
                f"{f' on {world_size} processes' if world_size > 1 else ''}; lower the batch size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = len(self.images)
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        return perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, self.rank, 0xA5A5))
        non_blocking = self.device.type == "cuda"
        for i in range(len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images.images[sel]
            y = self.images.labels[sel]
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.augment:
                x = augment_batch(x, g, self.padding)
            yield x.float().div_(255.0), y


def train_loader(
    images: ImageSet,
    batch_size: int,
    *,
    augment: bool = True,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    padding: int | None = None,
    device: str | torch.device = "cpu",
) -> TrainLoader:
    """Build a :class:`TrainLoader`; call ``set_epoch(epoch)`` before iterating each epoch."""
    return TrainLoader(
        images,
        batch_size,
        augment=augment,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        padding=padding,
        device=device,
    )


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10-C (official release)
# ----------------------------------------------------------------------------------------------------------------


def load_cifar_c(
    directory: str | os.PathLike,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Read the official CIFAR-10-C / CIFAR-100-C layout.

    ``directory`` holds ``labels.npy`` (``5*M`` labels) and one ``NAME.npy`` per corruption, ``(5*M, H, W, C)`` uint8,
    the five severities stacked in order 1..5.  Arrays are memory-mapped.  Returns
    ``{name: {severity: (images uint8 (M, H, W, C), labels int (M,))}}`` with names sorted (or in the order given).
    """
    root = Path(os.path.expanduser(str(directory)))
    if not root.is_dir():
        raise DataError(f"CIFAR-C directory {root} not found; pass the folder holding labels.npy and NAME.npy files")
    severities = tuple(int(s) for s in severities)
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities):
        raise DataError(f"severities must be chosen from 1..5, got {list(severities)}")
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise DataError(f"{root} has no labels.npy; point to the extracted CIFAR-10-C release")
    available = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
    if names is None:
        names = available
        if not names:
            raise DataError(f"{root} has labels.npy but no corruption files (NAME.npy)")
    else:
        names = list(names)
        missing = [nm for nm in names if nm not in available]
        if missing:
            raise DataError(f"{root} has no {', '.join(m + '.npy' for m in missing)}; available: {', '.join(available) or 'none'}")
        if not names:
            raise DataError("no CIFAR-C corruptions requested")

    labels = _load_npy(labels_path)
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise DataError(f"{labels_path} has shape {tuple(labels.shape)}; expected a non-empty 1-D array")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path} has dtype {labels.dtype}; labels must be integers")
    total = int(labels.shape[0])
    if total % 5:
        raise DataError(f"{labels_path} holds {total} labels, not a multiple of 5 (one block per severity)")
    m = total // 5

    out: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for name in names:
        path = root / f"{name}.npy"
        arr = _load_npy(path)
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise DataError(f"{path} has shape {tuple(arr.shape)}; expected (5*M, H, W, C) with C = 1 or 3")
        if arr.dtype != np.uint8:
            raise DataError(f"{path} has dtype {arr.dtype}; expected uint8")
        if arr.shape[0] != total:
            raise DataError(
                f"{path} holds {arr.shape[0]} images but labels.npy holds {total}; the files must have equal length"
            )
        out[name] = {s: (arr[(s - 1) * m : s * m], labels[(s - 1) * m : s * m]) for s in severities}
    return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path} ({reason}); re-extract the CIFAR-C archive") from None
