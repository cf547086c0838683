"""Datasets, augmentations and the resumable sampler.

Sources: an ImageFolder root (``train/`` and ``val/`` class folders) or scikit-learn's
bundled digits (1797 8×8 grey images, upsampled to a small RGB image; a fixed stratified
split, 1347 train / 450 val). Augmentations follow the INTL paper (Appendix E.2): BYOL's
two views (Table A: asymmetric blur and solarisation) or the 6-crop multi-crop of Table B;
digits get the same recipe without flips, hue or saturation and with milder crops.

Reproducible resume: the sampler yields ``(index, seed)`` pairs, and every view of a sample
is drawn from a generator seeded with that seed (a function of the run's seed, the epoch
and the index). A batch is therefore the same whether the run was interrupted or not, with
any number of workers.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2

from .cli import RunError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DIGITS_SIZE = 16  # the 8×8 digits are upsampled (bilinear) to 16×16
DIGITS_VAL_FRACTION = 0.25

# INTL Table B: relative crop sizes and (min, max) scales of the 6 multi-crop views.
MULTI_CROP_SIZES = (224, 224, 192, 160, 128, 96)
MULTI_CROP_SCALES = ((0.2, 1.0), (0.2, 1.0), (0.171, 0.857), (0.143, 0.714), (0.114, 0.571), (0.086, 0.429))


# ----------------------------------------------------------------------------- sources


def check_data(data: str, splits: Sequence[str]) -> None:
    """The cheap checks of ``--data`` (before any scan): ``digits``, or a folder with these splits."""
    if data == "digits":
        return
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data: {root} is not a directory (expected an ImageFolder root, or 'digits')")
    for split in splits:
        path = root / split
        if not path.is_dir():
            raise UsageError(
                f"--data: {root} has no {split}/ folder; expected {path}/<class>/<image> (ImageFolder layout)"
            )


class FolderSource:
    """The images of one split of an ImageFolder root: ``root/split/<class>/<image>``."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        check_data(str(root), (split,))
        path = Path(root) / split
        try:
            folder = datasets.ImageFolder(str(path))
        except (FileNotFoundError, RuntimeError) as err:
            raise UsageError(f"--data: {path} holds no images in class folders ({err})") from None
        self.root = path
        self.classes: list[str] = folder.classes
        self.samples: list[tuple[str, int]] = folder.samples
        self.targets: list[int] = folder.targets

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(f"unreadable image {path}: {err}") from err
        return image, label


class DigitsSource:
    """scikit-learn's digits, one split of a fixed stratified split, as S×S RGB PIL images."""

    def __init__(self, split: str, size: int = DIGITS_SIZE) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"digits: split must be 'train' or 'val', got {split!r}")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        idx = torch.arange(len(data.target)).numpy()
        tr, va = train_test_split(idx, test_size=DIGITS_VAL_FRACTION, random_state=0, stratify=data.target)
        keep = tr if split == "train" else va
        x = torch.as_tensor(data.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = (
            (x.clamp(0, 1) * 255)
            .round()
            .to(torch.uint8)
            .squeeze(1)[..., None]
            .expand(-1, -1, -1, 3)
            .contiguous()
        )
        self.targets: list[int] = [int(t) for t in data.target[keep]]
        self.classes = [str(c) for c in range(10)]
        self.root = f"digits/{split}"

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, index: int) -> str:
        return f"{self.root}[{index}]"

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index].numpy()), self.targets[index]


class UnreadableImageError(RunError):
    """An image file that PIL cannot decode."""


def open_source(data: str, split: str) -> FolderSource | DigitsSource:
    """``--data digits`` or an ImageFolder root; ``split`` is ``train`` or ``val``."""
    if data == "digits":
        return DigitsSource(split)
    return FolderSource(data, split)


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(source: FolderSource | DigitsSource) -> dict:
    """What identifies a dataset wherever it is stored: its classes and files, not its path.

    For an ImageFolder split: the class folder names, and per class the number of images and
    a 64-bit BLAKE2b digest of its image paths relative to the class folder, sorted. These
    names are the ones the ImageFolder scan has already listed, so the fingerprint reads
    nothing more from the disk (no file sizes or contents: a stat of 1.28 M ImageNet files on
    a network file system would take minutes); a replaced image with the same name goes
    unnoticed. For digits: the same from the pixels and labels.

    Returns:
        {"kind", "classes": [names], "counts": [ints], "digests": [16 hex digits],
        "digest": 64 hex digits over all of these}.
    """
    n = len(source.classes)
    per_class: list[list[bytes]] = [[] for _ in range(n)]
    if isinstance(source, FolderSource):
        kind = "imagefolder"
        root = str(source.root)
        prefixes = [os.path.join(root, c) + os.sep for c in source.classes]
        for path, label in source.samples:
            pre = prefixes[label]
            rel = path[len(pre) :] if path.startswith(pre) else os.path.relpath(path, pre)
            per_class[label].append(rel.replace(os.sep, "/").encode("utf-8", "surrogateescape"))
    else:
        kind = "digits"
        for i, label in enumerate(source.targets):
            per_class[label].append(source.images[i].numpy().tobytes())
    counts = [len(names) for names in per_class]
    digests = [hashlib.blake2b(b"\0".join(sorted(names)), digest_size=8).hexdigest() for names in per_class]
    whole = hashlib.sha256()
    for name, count, digest in zip(source.classes, counts, digests, strict=True):
        whole.update(f"{name}\0{count}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return {
        "kind": kind,
        "classes": list(source.classes),
        "counts": counts,
        "digests": digests,
        "digest": whole.hexdigest(),
    }


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when they are equal)."""
    if saved.get("digest") == current.get("digest"):
        return []
    if saved.get("kind") != current.get("kind"):
        return [f"{saved.get('kind')} data then, {current.get('kind')} data now"]
    old = dict(zip(saved["classes"], zip(saved["counts"], saved["digests"], strict=True), strict=True))
    new = dict(zip(current["classes"], zip(current["counts"], current["digests"], strict=True), strict=True))
    out = []
    missing = [c for c in old if c not in new]
    added = [c for c in new if c not in old]
    if missing:
        out.append(f"{len(missing)} class folder(s) missing: {_listed(missing)}")
    if added:
        out.append(f"{len(added)} new class folder(s): {_listed(added)}")
    common = [c for c in old if c in new]
    counted = [f"{c} {old[c][0]} → {new[c][0]}" for c in common if old[c][0] != new[c][0]]
    renamed = [c for c in common if old[c][0] == new[c][0] and old[c][1] != new[c][1]]
    if counted:
        out.append(f"images per class changed: {_listed(counted)}")
    if renamed:
        out.append(f"same number of images but other file names in {_listed(renamed)}")
    if not out:  # same classes, counts and files, in another class order
        out.append("the class folders sort differently (so the labels differ)")
    return out


# ----------------------------------------------------------------------------- transforms


class RandomGaussianBlur(v2.Transform):
    """Gaussian blur of a PIL image with σ ~ U(σ_min, σ_max), applied with probability p (BYOL's blur).

    PIL's blur (radius σ) is ~30× faster than a tensor convolution at 224 px. The random
    draws use torch's generator, so seeded runs repeat.
    """

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.p, self.sigma = p, sigma

    def forward(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"RandomGaussianBlur: expected a PIL image, got {type(image).__name__}")
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return image
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius=s))


def _view(
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    mean: Sequence[float],
    std: Sequence[float],
    digits: bool,
) -> v2.Compose:
    """One BYOL-style view of a PIL image: crop, flip, colour jitter, grey, blur, solarise, normalise."""
    ops: list[Callable] = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if digits:  # grey digits: no flips (they change the class), no hue or saturation
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8)]
    else:
        ops += [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    ops += [
        RandomGaussianBlur(blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return v2.Compose(ops)


def pretrain_views(crop: int, multi_crop: bool, digits: bool) -> list[v2.Compose]:
    """The views of one sample for pretraining.

    Args:
        crop: size of the largest crop (224 on ImageNet); multi-crop sizes scale with it.
        multi_crop: 6 views (INTL Table B: 2×224 + 192, 160, 128, 96; blur 0.5, solarise
            0.1) instead of BYOL's 2 (Table A: blur 1.0/0.1, solarise 0.0/0.2).
        digits: the digits variant (no flip, no hue/saturation, crops no smaller than 30%).

    Returns:
        a list of transforms, one per view; the first view is the (EMA) target.
    """
    mean, std = (DIGITS_MEAN, DIGITS_STD) if digits else (IMAGENET_MEAN, IMAGENET_STD)
    if multi_crop:
        views = []
        for rel, (lo, hi) in zip(MULTI_CROP_SIZES, MULTI_CROP_SCALES, strict=True):
            size = max(4, round(crop * rel / 224))
            lo = max(lo, 0.3 * hi) if digits else lo
            views.append(_view(size, (lo, hi), 0.5, 0.1, mean, std, digits))
        return views
    scale = (0.3, 1.0) if digits else (0.08, 1.0)
    return [
        _view(crop, scale, 1.0, 0.0, mean, std, digits),
        _view(crop, scale, 0.1, 0.2, mean, std, digits),
    ]


def eval_transform(crop: int, digits: bool) -> v2.Compose:
    """No augmentation: Resize(crop·256/224) + CenterCrop(crop) (digits: as they are), normalised."""
    if digits:
        return v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(DIGITS_MEAN, DIGITS_STD)]
        )
    return v2.Compose(
        [
            v2.Resize(round(crop * 256 / 224), antialias=True),
            v2.CenterCrop(crop),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def classifier_train_transform(crop: int, digits: bool) -> v2.Compose:
    """Linear evaluation's train transform: RandomResizedCrop(crop) + horizontal flip (digits: no flip)."""
    if digits:
        ops = [v2.RandomResizedCrop(crop, scale=(0.5, 1.0), antialias=True)]
        mean, std = DIGITS_MEAN, DIGITS_STD
    else:
        ops = [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


# ----------------------------------------------------------------------------- dataset


class ViewDataset(Dataset):
    """Samples of a source as ``(views, label, skipped)``.

    ``dataset[(index, seed)]`` draws the views from a generator seeded with ``seed`` (the
    process's global generator is left as it was); ``dataset[index]`` uses the global one.
    ``skipped`` counts unreadable images replaced by the next readable one (only with
    ``skip_corrupt``; otherwise an unreadable image raises an error naming the file).
    """

    def __init__(
        self,
        source: FolderSource | DigitsSource,
        transforms: Sequence[Callable],
        skip_corrupt: bool = False,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.source = source
        self.transforms = list(transforms)
        self.skip_corrupt = skip_corrupt
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, index: int) -> tuple[object, int, int]:
        n = len(self.indices)
        for skipped in range(n):
            j = self.indices[(index + skipped) % n]
            try:
                image, label = self.source.load(j)
            except UnreadableImageError as err:
                if not self.skip_corrupt:
                    raise UnreadableImageError(
                        f"{err}; pass --skip-corrupt to skip unreadable images"
                    ) from None
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipping {err}", stacklevel=2)
                continue
            return image, label, skipped
        raise RuntimeError(f"--data: no readable image in {self.source.root}")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[list[torch.Tensor], int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label, skipped = self._load(index)
        if seed is None:
            return [t(image) for t in self.transforms], label, skipped
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [t(image) for t in self.transforms], label, skipped


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` (any process, any worker)."""
    return ((seed * 1_000_003 + epoch) * 2_000_003 + index) % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, equal share per rank) that yields
    ``(index, augmentation seed)`` and can start at a batch inside the epoch.

    Only whole batches are yielded (drop_last), so every rank takes the same number of
    steps of the same size (INTL's gathered whitening needs equal batches on every rank).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        if self.num_samples < batch_size:
            raise UsageError(
                f"--batch-size: {batch_size} images per rank but the dataset has only {len(dataset)} "
                f"images for {num_replicas} rank(s); use a smaller batch or more data"
            )
        self.batch_size = batch_size
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[: self.batches_per_epoch * self.batch_size]
        for i in indices[self.start_batch * self.batch_size :]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    sampler: torch.utils.data.Sampler | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader with pinned memory on GPUs and persistent workers when there are workers."""
    if workers < 0:
        raise UsageError(f"--workers must be an integer >= 0, got {workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        drop_last=drop_last,
        prefetch_factor=4 if workers > 0 else None,
    )
