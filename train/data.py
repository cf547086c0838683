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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
BLUR_SIGMA = (0.1, 2.0)  # BYOL's Gaussian blur: σ ~ U(0.1, 2.0) (radius of PIL's blur)

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

    def __init__(self, p: float, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        super().__init__()
        self.p, self.sigma = p, sigma

    def forward(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"RandomGaussianBlur: expected a PIL image, got {type(image).__name__}")
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return image
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        return image.filter(ImageFilter.GaussianBlur(radius=s))


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view as numbers, in the order the transforms apply: a random resized crop,
    then (each optional) a horizontal flip (p 0.5), colour jitter (strengths of brightness,
    contrast[, saturation, hue], applied with probability ``jitter_p``, in a random order),
    grayscale, Gaussian blur (σ ~ U(BLUR_SIGMA)) and solarisation (threshold 128), then the
    normalisation. ``torch_view`` builds the torchvision transform; the DALI loader
    (train/dali.py) draws the same parameters from the same seed and applies them.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    jitter: tuple[float, ...] | None = None
    jitter_p: float = 0.8
    gray_p: float | None = None
    blur_p: float | None = None
    solarize_p: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class EvalSpec:
    """No augmentation: resize the shorter side to ``resize`` and take the centre ``crop``
    (``resize`` None: the image as it is), then normalise."""

    crop: int
    resize: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def torch_view(spec: ViewSpec | EvalSpec) -> v2.Compose:
    """The torchvision transform (PIL image in, normalised float tensor out) of a view."""
    ops: list[Callable] = []
    if isinstance(spec, EvalSpec):
        if spec.resize is not None:
            ops += [v2.Resize(spec.resize, antialias=True), v2.CenterCrop(spec.crop)]
    else:
        ops.append(v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True))
        if spec.flip:
            ops.append(v2.RandomHorizontalFlip())
        if spec.jitter is not None:
            ops.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
        if spec.gray_p is not None:
            ops.append(v2.RandomGrayscale(p=spec.gray_p))
        if spec.blur_p is not None:
            ops.append(RandomGaussianBlur(spec.blur_p))
        if spec.solarize_p is not None:
            ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(ops)


def _view_spec(
    size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, digits: bool
) -> ViewSpec:
    """One BYOL-style view: crop, flip, colour jitter, grey, blur, solarise, normalise."""
    if digits:  # grey digits: no flips (they change the class), no hue or saturation
        return ViewSpec(
            size,
            scale,
            jitter=(0.4, 0.4),
            blur_p=blur_p,
            solarize_p=solarize_p,
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
        )
    return ViewSpec(
        size, scale, flip=True, jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p
    )


def pretrain_specs(crop: int, multi_crop: bool, digits: bool) -> list[ViewSpec]:
    """The views of one sample for pretraining.

    Args:
        crop: size of the largest crop (224 on ImageNet); multi-crop sizes scale with it.
        multi_crop: 6 views (INTL Table B: 2×224 + 192, 160, 128, 96; blur 0.5, solarise
            0.1) instead of BYOL's 2 (Table A: blur 1.0/0.1, solarise 0.0/0.2).
        digits: the digits variant (no flip, no hue/saturation, crops no smaller than 30%).

    Returns:
        one spec per view; the first view is the (EMA) target.
    """
    if multi_crop:
        views = []
        for rel, (lo, hi) in zip(MULTI_CROP_SIZES, MULTI_CROP_SCALES, strict=True):
            size = max(4, round(crop * rel / 224))
            lo = max(lo, 0.3 * hi) if digits else lo
            views.append(_view_spec(size, (lo, hi), 0.5, 0.1, digits))
        return views
    scale = (0.3, 1.0) if digits else (0.08, 1.0)
    return [_view_spec(crop, scale, 1.0, 0.0, digits), _view_spec(crop, scale, 0.1, 0.2, digits)]


def pretrain_views(crop: int, multi_crop: bool, digits: bool) -> list[v2.Compose]:
    """The torchvision transforms of ``pretrain_specs`` (same arguments), one per view."""
    return [torch_view(spec) for spec in pretrain_specs(crop, multi_crop, digits)]


def eval_spec(crop: int, digits: bool) -> EvalSpec:
    """Resize(crop·256/224) + CenterCrop(crop) (digits: as they are), normalised."""
    if digits:
        return EvalSpec(crop, None, DIGITS_MEAN, DIGITS_STD)
    return EvalSpec(crop, round(crop * 256 / 224))


def eval_transform(crop: int, digits: bool) -> v2.Compose:
    """No augmentation: Resize(crop·256/224) + CenterCrop(crop) (digits: as they are), normalised."""
    return torch_view(eval_spec(crop, digits))


def classifier_spec(crop: int, digits: bool) -> ViewSpec:
    """Linear evaluation's train view: RandomResizedCrop(crop) + horizontal flip (digits: no flip)."""
    if digits:
        return ViewSpec(crop, (0.5, 1.0), mean=DIGITS_MEAN, std=DIGITS_STD)
    return ViewSpec(crop, (0.08, 1.0), flip=True)


def classifier_train_transform(crop: int, digits: bool) -> v2.Compose:
    """Linear evaluation's train transform: RandomResizedCrop(crop) + horizontal flip (digits: no flip)."""
    return torch_view(classifier_spec(crop, digits))


# ----------------------------------------------------------------------------- dataset


def first_readable(
    source: FolderSource | DigitsSource,
    indices: Sequence[int],
    index: int,
    load: Callable[[int], tuple],
    skip_corrupt: bool,
    warned: set[int],
) -> tuple[tuple, int]:
    """``load(indices[index])``, or with ``skip_corrupt`` that of the next readable image.

    An unreadable image raises UnreadableImageError naming the file and ``--skip-corrupt``;
    with ``skip_corrupt`` it is replaced by the next one in ``indices`` (cyclically) and
    warned about once per file (``warned`` holds the source indices already reported).

    Returns:
        (what ``load`` returned, the number of unreadable images skipped).
    """
    n = len(indices)
    for skipped in range(n):
        j = indices[(index + skipped) % n]
        try:
            item = load(j)
        except UnreadableImageError as err:
            if not skip_corrupt:
                raise UnreadableImageError(f"{err}; pass --skip-corrupt to skip unreadable images") from None
            if j not in warned:
                warned.add(j)
                warnings.warn(f"skipping {err}", stacklevel=3)
            continue
        return item, skipped
    raise RuntimeError(f"--data: no readable image in {source.root}")


class ViewDataset(Dataset):
    """Samples of a source as ``(views, label, skipped)``.

    ``dataset[(index, seed)]`` draws the views from a generator seeded with ``seed`` (the
    process's global generator is left as it was); ``dataset[index]`` uses the global one.
    ``skipped`` counts unreadable images replaced by the next readable one (only with
    ``skip_corrupt``; otherwise an unreadable image raises an error naming the file).
    ``transforms``: callables, or view specs (``ViewSpec``/``EvalSpec``, kept as ``specs`` for
    the DALI loader) that become their torchvision transforms.
    """

    def __init__(
        self,
        source: FolderSource | DigitsSource,
        transforms: Sequence[Callable | ViewSpec | EvalSpec],
        skip_corrupt: bool = False,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.source = source
        specs = [t for t in transforms if isinstance(t, ViewSpec | EvalSpec)]
        self.specs: list[ViewSpec | EvalSpec] | None = specs if len(specs) == len(transforms) else None
        self.transforms = [torch_view(t) if isinstance(t, ViewSpec | EvalSpec) else t for t in transforms]
        self.skip_corrupt = skip_corrupt
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, index: int) -> tuple[object, int, int]:
        (image, label), skipped = first_readable(
            self.source, self.indices, index, self.source.load, self.skip_corrupt, self._warned
        )
        return image, label, skipped

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


class SeededSampler:
    """Keys ``(index, sample_seed(seed, epoch, index))`` for the indices of ``sampler`` (e.g. a
    DistributedSampler; its ``set_epoch`` goes through), for loaders that need per-sample seeds."""

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for i in self.sampler:
            yield i, sample_seed(self.seed, epoch, i)

    def __len__(self) -> int:
        return len(self.sampler)


LOADERS = ("torch", "dali")


def check_loader(loader: str) -> None:
    """The cheap check of ``--loader``: ``dali`` needs NVIDIA DALI installed (a one-line error
    naming the install command otherwise)."""
    if loader not in LOADERS:
        raise UsageError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if loader == "dali":
        from .dali import require_dali

        require_dali()


def make_view_loader(
    loader: str,
    dataset: ViewDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Iterable | None = None,
    drop_last: bool = False,
    hw_decoder_load: float | None = None,
    hue: str = "pil",
) -> Iterable:
    """Batches ``(views, labels, skipped)`` of a ``ViewDataset`` built from view specs.

    Args:
        loader: ``torch`` (a DataLoader: ``workers`` processes decode and augment with PIL and
            torchvision) or ``dali`` (train/dali.py: NVIDIA DALI decodes and augments, on
            ``device`` when it is a GPU; ``workers`` processes read the files and draw the
            parameters, and DALI runs ``max(1, workers)`` CPU threads).
        sampler: the keys, e.g. a ResumableSampler's ``(index, seed)``; default every index in order.
        hw_decoder_load: ``dali`` on a GPU: the hardware JPEG decoder's share (default DALI's).
        hue: ``dali``: "pil" (PIL's hue shift, as the torch loader) or "yiq" (DALI's faster one).

    Both give the same batches of the same samples; views differ within the bounds stated in
    train/dali.py, and the DALI loader delivers them on ``device``.
    """
    if loader == "torch":
        return make_loader(dataset, batch_size, workers, device.type == "cuda", sampler, drop_last)
    check_loader(loader)
    if dataset.specs is None:
        raise ValueError("make_view_loader: --loader dali needs a ViewDataset built from view specs")
    from .dali import HW_DECODER_LOAD, DaliLoader

    return DaliLoader(
        dataset.source,
        dataset.specs,
        batch_size,
        sampler=sampler,
        indices=dataset.indices,
        skip_corrupt=dataset.skip_corrupt,
        workers=workers,
        device=device,
        drop_last=drop_last,
        hw_decoder_load=HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
        hue=hue,
    )


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
