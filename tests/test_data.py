"""Tests of ttcompress.data: loading (npz, ImageFolder, torchvision CIFAR), validation, training loader, CIFAR-C."""

from __future__ import annotations

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from ttcompress.data import (
    ImageSet,
    augment_batch,
    check_compatible,
    load_cifar_c,
    load_split,
    train_loader,
)
from ttcompress.errors import DataError, UserError

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _rng_images(n, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


class TinyCNN(torch.nn.Module):
    def __init__(self, c=3, k=10):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, k)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _imageset(images_nhwc, labels, num_classes=None, classes=None):
    return ImageSet(
        images=torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        num_classes=num_classes if num_classes is not None else int(max(labels)) + 1,
        classes=classes,
        source="test",
    )


# ----------------------------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------------------------


def test_npz_xy_nhwc_with_classes(tmp_path):
    x = _rng_images(7)
    y = np.array([0, 1, 2, 3, 0, 1, 2])
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, classes=np.array(["a", "b", "c", "d", "e"]))
    for split in ("train", "test"):
        s = load_split(str(p), split)
        assert s.images.dtype == torch.uint8 and s.labels.dtype == torch.int64
        assert tuple(s.images.shape) == (7, 3, 8, 8)
        assert torch.equal(s.images, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        assert s.labels.tolist() == y.tolist()
        assert s.num_classes == 5 and s.classes == ["a", "b", "c", "d", "e"]
        assert len(s) == 7


def test_npz_train_test_nchw(tmp_path):
    xtr, xte = _rng_images(6, seed=1), _rng_images(4, seed=2)
    p = tmp_path / "d.npz"
    np.savez(
        p,
        train_x=xtr.transpose(0, 3, 1, 2),
        train_y=np.array([0, 1, 2, 0, 1, 2]),
        test_x=xte.transpose(0, 3, 1, 2),
        test_y=np.array([2, 2, 1, 0]),
    )
    tr = load_split(str(p), "train")
    te = load_split(str(p), "test")
    assert torch.equal(tr.images, torch.from_numpy(xtr.transpose(0, 3, 1, 2).copy()))
    assert torch.equal(te.images, torch.from_numpy(xte.transpose(0, 3, 1, 2).copy()))
    assert te.labels.tolist() == [2, 2, 1, 0]
    assert tr.num_classes == 3 and te.num_classes == 3 and te.classes is None


def test_npz_float_and_grayscale(tmp_path):
    x = _rng_images(5, c=1)
    p = tmp_path / "f.npz"
    np.savez(p, x=x.astype(np.float32) / 255.0, y=np.array([0, 1, 4, 1, 0]))
    s = load_split(str(p))
    assert tuple(s.images.shape) == (5, 1, 8, 8)
    assert torch.equal(s.images, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert s.num_classes == 5  # max label + 1


def test_npz_only_train_asked_for_test(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, train_x=_rng_images(3), train_y=np.array([0, 1, 0]))
    assert len(load_split(str(p), "train")) == 3
    with pytest.raises(DataError, match="test_x"):
        load_split(str(p), "test")


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "arrays, pattern",
    [
        (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64)), "4-D"),
        (dict(x=np.zeros((4, 8, 8, 3, 1), np.uint8), y=np.zeros(4, np.int64)), "4-D"),
        (dict(x=np.zeros((4, 8, 8, 5), np.uint8), y=np.zeros(4, np.int64)), "size 1 or 3"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0.0, 1.5, 1.0, 0.0])), "integer"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, -1, 1, 0])), "negative"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 3]), classes=np.array(["a", "b"])), "out of range"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 0])), "same length"),
        (dict(x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, np.int64)), "empty"),
        (dict(x=np.full((4, 8, 8, 3), 255.0, np.float32), y=np.zeros(4, np.int64)), r"\[0, 1\]"),
        (dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64)), "expected x/y"),
        (dict(x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros((4, 2), np.int64)), "1-D"),
    ],
    ids=[
        "ndim3",
        "ndim5",
        "channels5",
        "float-labels",
        "negative-labels",
        "label-ge-classes",
        "length-mismatch",
        "empty",
        "float-range",
        "wrong-keys",
        "labels-2d",
    ],
)
def test_npz_errors(tmp_path, arrays, pattern):
    p = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=pattern):
        load_split(p, "test")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(str(tmp_path / "nope.npz"))
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="cannot read"):
        load_split(str(bad))
    # a truncated archive
    good = tmp_path / "good.npz"
    np.savez(good, x=_rng_images(50), y=np.zeros(50, np.int64))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(DataError):
        load_split(str(trunc))
    other = tmp_path / "data.csv"
    other.write_text("1,2,3\n")
    with pytest.raises(DataError, match="unsupported"):
        load_split(str(other))
    with pytest.raises(DataError, match="split"):
        load_split(str(good), "validation")


def test_errors_are_user_errors_one_line(tmp_path):
    p = _write_npz(tmp_path / "bad.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, -1, 1, 0]))
    with pytest.raises(UserError) as info:
        load_split(p)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------------


def test_image_folder_flat(tmp_path):
    imgs = _rng_images(5, seed=3)
    layout = [("dog", 0), ("cat", 1), ("cat", 2), ("emu", 3), ("dog", 4)]
    for cls, i in layout:
        _save_png(tmp_path / cls / f"img{i}.png", imgs[i])
    for split in ("train", "test"):
        s = load_split(str(tmp_path), split)
        assert s.classes == ["cat", "dog", "emu"] and s.num_classes == 3
        # sorted by class, then by file name
        order = [1, 2, 0, 4, 3]
        assert s.labels.tolist() == [0, 0, 1, 1, 2]
        assert torch.equal(s.images, torch.from_numpy(imgs[order].transpose(0, 3, 1, 2).copy()))


def test_image_folder_split_layout(tmp_path):
    imgs = _rng_images(6, c=1, seed=4)
    _save_png(tmp_path / "train" / "a" / "0.png", imgs[0])
    _save_png(tmp_path / "train" / "b" / "1.png", imgs[1])
    _save_png(tmp_path / "train" / "c" / "2.png", imgs[2])
    # the validation split lacks class "a": indices must still agree with train
    _save_png(tmp_path / "val" / "b" / "3.png", imgs[3])
    _save_png(tmp_path / "val" / "c" / "4.png", imgs[4])
    tr = load_split(str(tmp_path), "train")
    te = load_split(str(tmp_path), "test")
    assert tr.classes == te.classes == ["a", "b", "c"]
    assert tr.labels.tolist() == [0, 1, 2]
    assert te.labels.tolist() == [1, 2]
    assert tuple(te.images.shape) == (2, 1, 8, 8)  # grayscale kept as one channel
    assert torch.equal(te.images, torch.from_numpy(imgs[[3, 4]].transpose(0, 3, 1, 2).copy()))


def test_image_folder_split_missing(tmp_path):
    _save_png(tmp_path / "train" / "a" / "0.png", _rng_images(1)[0])
    with pytest.raises(DataError, match="test"):
        load_split(str(tmp_path), "test")


def test_image_folder_errors(tmp_path):
    mixed = tmp_path / "mixed"
    _save_png(mixed / "a" / "0.png", _rng_images(1, 8, 8)[0])
    _save_png(mixed / "b" / "1.png", _rng_images(1, 12, 10)[0])
    with pytest.raises(DataError, match="8x8") as info:
        load_split(str(mixed))
    assert "10x12" in str(info.value)

    broken = tmp_path / "broken"
    _save_png(broken / "a" / "0.png", _rng_images(1)[0])
    (broken / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="1.png"):
        load_split(str(broken))

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_split(str(empty))

    noclass = tmp_path / "noclass"
    noclass.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_split(str(noclass))


# ----------------------------------------------------------------------------------------------------------------
# torchvision CIFAR (local copy; no network)
# ----------------------------------------------------------------------------------------------------------------


def _fake_cifar10(root, n_per_batch=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    names = [f"class{i}" for i in range(10)]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return batches, names


def test_cifar10_local_copy(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    batches, names = _fake_cifar10(tmp_path)
    te = load_split("cifar10", "test", data_root=str(tmp_path), download=False)
    data, labels = batches["test_batch"]
    assert torch.equal(te.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert te.labels.tolist() == labels
    assert te.classes == names and te.num_classes == 10
    tr = load_split("CIFAR10", "train", data_root=str(tmp_path), download=True)  # present: no download attempted
    assert len(tr) == 20


def test_cifar10_download_failure(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    with pytest.raises(DataError, match="--data-root") as info:
        load_split("cifar10", "test", data_root=str(tmp_path / "root"))
    assert ".npz" in str(info.value)
    with pytest.raises(DataError, match="--data-root"):
        load_split("cifar100", "test", data_root=str(tmp_path / "root2"), download=False)


# ----------------------------------------------------------------------------------------------------------------
# ImageSet and check_compatible
# ----------------------------------------------------------------------------------------------------------------


def test_imageset_subset_and_batches():
    x = _rng_images(10)
    s = _imageset(x, list(range(10)))
    sub = s.subset(4)
    assert len(sub) == 4 and sub.labels.tolist() == [0, 1, 2, 3]
    assert s.subset(None) is s and len(s.subset(100)) == 10
    with pytest.raises(DataError):
        s.subset(0)
    got = list(s.batches(3))
    assert [b[0].shape[0] for b in got] == [3, 3, 3, 1]
    xs = torch.cat([b[0] for b in got])
    assert xs.dtype == torch.float32 and float(xs.min()) >= 0 and float(xs.max()) <= 1
    assert torch.allclose(xs * 255, s.images.float())
    assert torch.cat([b[1] for b in got]).tolist() == list(range(10))


def test_check_compatible():
    s = _imageset(_rng_images(4), [0, 1, 2, 3])
    model = TinyCNN(3, 10)
    model.train()
    assert check_compatible(s, model) == 10
    assert model.training  # mode restored
    gray = _imageset(_rng_images(4, c=1), [0, 1, 2, 3])
    with pytest.raises(DataError, match="1x8x8") as info:
        check_compatible(gray, model)
    assert "\n" not in str(info.value)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    with pytest.raises(DataError, match="3x8x8"):
        check_compatible(s, flat)
    with pytest.raises(DataError, match="labels up to 3"):
        check_compatible(s, TinyCNN(3, 3))
    named = _imageset(_rng_images(4), [0, 1, 2, 3], num_classes=5, classes=list("abcde"))
    with pytest.raises(DataError, match="5 classes"):
        check_compatible(named, model)
    assert check_compatible(named, TinyCNN(3, 5)) == 5


# ----------------------------------------------------------------------------------------------------------------
# training loader
# ----------------------------------------------------------------------------------------------------------------


def _indexed_set(n=50, h=8, w=8, seed=0):
    """Labels are the image indices, so yielded labels reveal which images a batch holds."""
    return _imageset(_rng_images(n, h, w, seed=seed), list(range(n)), num_classes=n)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_train_loader_determinism():
    s = _indexed_set()
    a = train_loader(s, 8, seed=3)
    b = train_loader(s, 8, seed=3)
    xa0, ya0 = _epoch(a, 0)
    xb0, yb0 = _epoch(b, 0)
    assert torch.equal(xa0, xb0) and torch.equal(ya0, yb0)
    xa1, ya1 = _epoch(a, 1)
    assert not torch.equal(ya0, ya1)
    xa0b, ya0b = _epoch(a, 0)  # going back to epoch 0 replays it exactly
    assert torch.equal(xa0, xa0b) and torch.equal(ya0, ya0b)
    xc, yc = _epoch(train_loader(s, 8, seed=4), 0)
    assert not torch.equal(ya0, yc)
    assert len(a) == 50 // 8 and ya0.numel() == 48 and len(set(ya0.tolist())) == 48
    assert len(train_loader(s, 8, drop_last=False)) == 7
    assert _epoch(train_loader(s, 8, drop_last=False), 0)[1].numel() == 50


def test_train_loader_no_shuffle_no_augment():
    s = _indexed_set(20)
    loader = train_loader(s, 6, augment=False, shuffle=False, drop_last=False)
    x, y = _epoch(loader, 5)
    assert y.tolist() == list(range(20))
    assert torch.allclose(x * 255, s.images.float())


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_loader_rank_sharding(world_size):
    s = _indexed_set(50)
    per_rank = 50 // world_size
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            loader = train_loader(s, 4, seed=1, rank=rank, world_size=world_size, drop_last=False)
            _, y = _epoch(loader, epoch)
            assert y.numel() == per_rank
            seen.append(set(y.tolist()))
        union = set().union(*seen)
        assert len(union) == per_rank * world_size  # pairwise disjoint
    with pytest.raises(DataError):
        train_loader(s, 4, rank=2, world_size=2)


def _all_augmentations(img, pad):
    """Every crop/flip of one (C,H,W) uint8 image, by brute force."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad : pad + h, pad : pad + w] = img
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_augmentation_is_crop_and_flip():
    s = _indexed_set(40, h=32, w=32, seed=5)
    loader = train_loader(s, 10, seed=0)
    assert loader.padding == 4  # the paper's 4-pixel padding for 32x32
    x, y = _epoch(loader, 0)
    assert tuple(x.shape) == (40, 3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    changed = 0
    for i in range(12):
        aug = (x[i] * 255).round().to(torch.uint8)
        orig = s.images[int(y[i])]
        assert any(torch.equal(aug, cand) for cand in _all_augmentations(orig, 4)), f"image {i}"
        changed += not torch.equal(aug, orig)
    assert changed >= 8  # augmentation actually happens


def test_augment_batch_zero_padding_and_offsets():
    # a white image with one grey mark; every (crop offset, flip) gives a distinct picture
    n, pad = 400, 2
    x = torch.full((n, 1, 8, 8), 255, dtype=torch.uint8)
    x[:, 0, 3, 3] = 100
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=pad)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.zeros(1, 8 + 2 * pad, 8 + 2 * pad, dtype=torch.uint8)
    padded[:, pad : pad + 8, pad : pad + 8] = x[0]
    lookup = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + 8, dx : dx + 8]
            lookup[crop.numpy().tobytes()] = (dy, dx, False)
            lookup[crop.flip(-1).numpy().tobytes()] = (dy, dx, True)
    assert len(lookup) == 2 * (2 * pad + 1) ** 2
    seen = [lookup[img.numpy().tobytes()] for img in out]  # KeyError: not a zero-padded crop (+ flip)
    # every offset pair occurs, and about half of the images are flipped
    assert len({(dy, dx) for dy, dx, _ in seen}) == (2 * pad + 1) ** 2
    flips = sum(f for _, _, f in seen)
    assert 0.35 * n < flips < 0.65 * n


def test_train_loader_too_small():
    with pytest.raises(DataError, match="batch size"):
        train_loader(_indexed_set(5), 8)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10-C layout
# ----------------------------------------------------------------------------------------------------------------


def _write_cifar_c(root, m=6, names=("fog", "snow")):
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(m) % 10, 5)
    np.save(root / "labels.npy", labels)
    arrays = {}
    for k, name in enumerate(names):
        arr = np.random.default_rng(k).integers(0, 256, size=(5 * m, 8, 8, 3), dtype=np.uint8)
        np.save(root / f"{name}.npy", arr)
        arrays[name] = arr
    return labels, arrays


def test_load_cifar_c_layout(tmp_path):
    labels, arrays = _write_cifar_c(tmp_path, m=6)
    out = load_cifar_c(tmp_path)
    assert list(out) == ["fog", "snow"]
    for name, arr in arrays.items():
        assert sorted(out[name]) == [1, 2, 3, 4, 5]
        for s in range(1, 6):
            imgs, labs = out[name][s]
            assert np.array_equal(imgs, arr[(s - 1) * 6 : s * 6])
            assert np.array_equal(labs, labels[(s - 1) * 6 : s * 6])
    sub = load_cifar_c(tmp_path, names=["snow"], severities=(2, 5))
    assert list(sub) == ["snow"] and sorted(sub["snow"]) == [2, 5]
    assert np.array_equal(sub["snow"][5][0], arrays["snow"][24:30])
    assert isinstance(np.load(tmp_path / "snow.npy", mmap_mode="r"), np.memmap)


def test_load_cifar_c_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_cifar_c(tmp_path / "absent")
    d1 = tmp_path / "nolabels"
    _write_cifar_c(d1)
    (d1 / "labels.npy").unlink()
    with pytest.raises(DataError, match="labels.npy"):
        load_cifar_c(d1)
    d2 = tmp_path / "nocorr"
    d2.mkdir()
    np.save(d2 / "labels.npy", np.zeros(10, np.int64))
    with pytest.raises(DataError, match="no corruption files"):
        load_cifar_c(d2)
    d3 = tmp_path / "inconsistent"
    _write_cifar_c(d3, m=6)
    np.save(d3 / "fog.npy", np.zeros((25, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="equal length"):
        load_cifar_c(d3)
    d4 = tmp_path / "missing-name"
    _write_cifar_c(d4)
    with pytest.raises(DataError, match="frost.npy"):
        load_cifar_c(d4, names=["fog", "frost"])
    with pytest.raises(DataError, match="severities"):
        load_cifar_c(d4, severities=(0, 1))
    d5 = tmp_path / "not5"
    d5.mkdir()
    np.save(d5 / "labels.npy", np.zeros(12, np.int64))
    np.save(d5 / "fog.npy", np.zeros((12, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="multiple of 5"):
        load_cifar_c(d5)
