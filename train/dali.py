"""The DALI loader (``--loader dali``): the recipes of train/data.py decoded and augmented by
NVIDIA DALI, on the GPU (``mixed`` JPEG decode, every operator on the GPU, batches handed over
on the GPU) or with DALI's CPU operators on a machine without one. Same pipeline either way:
only the decoder's device and the pipeline's device_id change.

Order and randomness come from this project, not from DALI. The sampler's ``(index, seed)``
pairs are the one source: for every sample, Python draws each view's parameters from a
generator seeded with the sample's seed, with the calls and in the order torchvision's
transforms make them (so the torch loader draws the very same numbers: tested against the
transforms themselves), and feeds them to the pipeline (``external_source``); DALI only
applies them and none of its random operators is used. A view therefore depends on its sample
alone, not on the batch it lands in, the batch size, the thread or worker count, or a restart.

How each operation matches the torch loader (PIL images through torchvision's v2 transforms):

- crop: a slice of the decoded image, then a linear antialiased resize (PIL: crop, then its
  bilinear resampling, which rounds after each axis): within one grey level;
- flip, solarisation (a lookup table), grayscale (PIL's integer luma formula): exact;
- brightness, contrast, saturation: PIL's blends written out as DALI arithmetic (contrast about
  the rounded mean of the luma, rounding down and clipping after each operation, as PIL does):
  exact but for float rounding, which can move a pixel by one level;
- hue: PIL's shift of the hue of its 8-bit HSV image, written out as DALI arithmetic
  (``_pil_hue``): exact but where float32 and PIL's double land on two sides of a truncation,
  one hue or saturation step. On a CPU this costs ~4 ms per 224-px view; ``hue="yiq"`` uses
  DALI's ``hsv`` operator instead (a rotation in YIQ, fast but several grey levels away from
  PIL's result; measured in train/README.md);
- blur: PIL's GaussianBlur is three box blurs per axis (rounded after each); the same six box
  filters run here (``fn.filter``, edges clamped): within one grey level;
- normalisation: crop_mirror_normalize (float32, CHW), a few float32 ulps.

Unreadable images: the torch loader finds them when PIL decodes a sample; DALI would abort the
whole batch. So every file is read and its header parsed (PIL, no decoding) when its sample is
prepared, and a JPEG or PNG that does not end as a complete file should (a truncated download)
is decoded by PIL first: these give the torch loader's error, or its ``--skip-corrupt``
replacement by the next readable image, per sample. A file that passes these checks and still
fails in DALI aborts its batch: each of the batch's files is then decoded by PIL, the
unreadable ones are treated as above and the batch runs again on a new pipeline.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .cli import RunError, UsageError
from .data import (
    BLUR_SIGMA,
    DigitsSource,
    EvalSpec,
    FolderSource,
    UnreadableImageError,
    ViewSpec,
    first_readable,
)

# pyproject.toml's `dali` extra installs DALI for CUDA 13 (tested with DALI 2.4.0).
INSTALL = (
    'pip install "intl_kernels[dali]" (in a checkout: pip install -e ".[dali]"; with a torch '
    "built for CUDA 12: pip install nvidia-dali-cuda120)"
)
HW_DECODER_LOAD = 0.65  # DALI's default share of JPEGs for the A100/H100 hardware decoder
# ColorJitter's operations in the pipeline, in the order of the sample's random permutation:
# brightness, contrast, saturation, hue (HUE_MODES "pil": four operators; "yiq": saturation and
# hue in one, see _colour_op).
_BRIGHTNESS, _CONTRAST, _SATURATION_HUE, _HUE = range(4)
HUE_MODES = ("pil", "yiq")
_FLOOR_SHIFT = -0.5 / 255  # brightness_shift (a fraction of 255) that makes DALI's rounding a floor
_SOLARIZED = [i if i < 128 else 255 - i for i in range(256)]


def require_dali() -> None:
    """Import DALI or raise a one-line UsageError naming the install command."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"--loader dali needs NVIDIA DALI, which is not installed ({err}); {INSTALL}"
        ) from None


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one view (a ``ViewSpec`` applied to one image).

    ``order`` lists the colour operations in the order they apply (0 brightness, 1 contrast,
    2 saturation, 3 hue; empty: no colour jitter); the factors of the others are unused.
    ``sigma``: the blur's (None: no blur).
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool = False
    order: tuple[int, ...] = ()
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    gray: bool = False
    sigma: float | None = None
    solarize: bool = False


@functools.lru_cache(maxsize=64)
def _jitter_ranges(strengths: tuple[float, ...]) -> tuple[tuple[float, float] | None, ...]:
    """ColorJitter's ranges of brightness, contrast, saturation and hue (None: not jittered)."""
    cj = v2.ColorJitter(*strengths)
    return cj.brightness, cj.contrast, cj.saturation, cj.hue


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> torch.Tensor:
    return torch.log(torch.tensor(ratio))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g).item())


def _happens(g: torch.Generator, p: float) -> bool:
    """torchvision's random application: one draw, applied when it is below p."""
    return bool(torch.rand(1, generator=g) < p)


def _draw_crop(spec: ViewSpec, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's window (top, left, height, width): up to 10 tries of a scale and a
    log-uniform aspect ratio, else the centre crop clipped to the ratio range."""
    area = height * width
    log_ratio = _log_ratio(spec.ratio)
    for _ in range(10):
        target = area * _uniform(g, spec.scale[0], spec.scale[1])
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(spec.ratio):
        w, h = width, int(round(width / min(spec.ratio)))
    elif in_ratio > max(spec.ratio):
        w, h = int(round(height * max(spec.ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(spec: ViewSpec, height: int, width: int, g: torch.Generator) -> ViewParams:
    """The parameters of one view of an image of ``height`` × ``width``, drawn from ``g`` with
    the calls torchvision's transforms of ``spec`` make, in their order (a skipped transform
    draws nothing further)."""
    top, left, h, w = _draw_crop(spec, height, width, g)
    out: dict = {"top": top, "left": left, "height": h, "width": w}
    if spec.flip:
        out["flip"] = _happens(g, 0.5)
    if spec.jitter is not None and _happens(g, spec.jitter_p):
        ranges = _jitter_ranges(tuple(spec.jitter))
        perm = torch.randperm(4, generator=g).tolist()
        names = ("brightness", "contrast", "saturation", "hue")
        factors = {n: _uniform(g, *r) for n, r in zip(names, ranges, strict=True) if r is not None}
        out["order"] = tuple(i for i in perm if ranges[i] is not None)
        out.update(factors)
    if spec.gray_p is not None:
        out["gray"] = _happens(g, spec.gray_p)
    skip_blur = (
        spec.blur_p is not None and spec.blur_p < 1 and float(torch.rand((), generator=g)) >= spec.blur_p
    )
    if spec.blur_p is not None and not skip_blur:
        out["sigma"] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * float(torch.rand((), generator=g))
    if spec.solarize_p is not None:
        out["solarize"] = _happens(g, spec.solarize_p)
    return ViewParams(**out)


def draw_sample(specs: Sequence[ViewSpec], seed: int, height: int, width: int) -> list[ViewParams]:
    """Every view of one sample, from its seed (what ``ViewDataset[(index, seed)]`` draws)."""
    g = torch.Generator().manual_seed(seed)
    return [draw_view(spec, height, width, g) for spec in specs]


def hue_steps(hue: float) -> int:
    """torchvision's hue factor as PIL applies it: a shift of the 8-bit hue by
    ``np.int32(hue * 255)`` (truncated), modulo 256 as its uint8 addition wraps."""
    return int(np.int32(hue * 255)) % 256


def hue_degrees(hue: float) -> float:
    """The rotation for torchvision's hue factor: its PIL kernel shifts the 8-bit hue by
    ``np.int32(hue * 255)`` (whole 1/255 turns, truncated), which is this many degrees."""
    return int(np.int32(hue * 255)) * 360.0 / 255.0


def eval_geometry(spec: EvalSpec, height: int, width: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """torchvision's Resize(shorter side) + CenterCrop: ((new height, new width), (top, left, h, w))."""
    if spec.resize is None:
        return (height, width), (0, 0, height, width)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    nh, nw = (new_long, new_short) if width <= height else (new_short, new_long)
    c = spec.crop
    return (nh, nw), (int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0)), c, c)


def pil_box_radius(sigma: float, passes: int = 3) -> float:
    """The box radius PIL's GaussianBlur(σ) uses for each of its ``passes`` box blurs, computed in
    float32 as PIL computes it (Gwosdek et al. 2011, extended box filter)."""
    f = np.float32
    r = f(sigma)
    s2 = f(f(r * r) / f(passes))
    big_l = f(math.sqrt(12.0 * float(s2) + 1.0))
    lo = f(math.floor((float(big_l) - 1.0) / 2.0))
    a = f((f(2) * lo + f(1)) * (lo * (lo + f(1)) - f(3) * s2))
    a = f(a / (f(6) * (s2 - (lo + f(1)) * (lo + f(1)))))
    return float(f(lo + a))


def pil_box_kernel(radius: float) -> np.ndarray:
    """The weights of one of PIL's box blurs of (fractional) ``radius``: 2⌊r⌋ + 1 taps of
    weight ww and the two next ones of fw, in 24-bit fixed point, as float32 ((1, K))."""
    ri = int(radius)
    ww = int(np.float32(1 << 24) / (np.float32(radius) * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (ri * 2 + 1) * ww) // 2
    k = np.full(2 * ri + 3, ww, dtype=np.float64)
    k[0] = k[-1] = fw
    return (k / (1 << 24)).astype(np.float32)[None, :]


# ----------------------------------------------------------------------------- inputs

# Formats whose complete files end in a known way: a file that does not is decoded by PIL before
# DALI sees it (a truncated JPEG or PNG aborts a DALI batch).
_TAILS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}


def _complete(fmt: str | None, data: bytes) -> bool:
    tails = _TAILS.get(fmt or "")
    if tails is None:
        return True
    end = data.rstrip(b"\0\r\n ")  # some writers pad after the end marker
    return any(end.endswith(t) for t in tails)


class DaliInputs(Dataset):
    """What the pipeline needs of one sample, prepared in Python: ``inputs[(position, seed)]``
    (``position`` indexes ``indices``; ``seed`` may be None for evaluation views) returns
    ``(key, image, label, skipped, feeds)``: the key, the encoded file (uint8) or, for digits, the HWC uint8
    array; the label; the unreadable images skipped (``--skip-corrupt``); and one array per
    pipeline input name. ``hue``: how the pipeline applies hue (HUE_MODES).
    """

    def __init__(
        self,
        source: FolderSource | DigitsSource,
        specs: Sequence[ViewSpec | EvalSpec],
        indices: Sequence[int] | None = None,
        skip_corrupt: bool = False,
        hue: str = "pil",
    ) -> None:
        self.source = source
        self.hue = hue
        self.specs = list(specs)
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.skip_corrupt = skip_corrupt
        self.encoded = isinstance(source, FolderSource)
        self.bad: set[int] = set()  # source indices found unreadable after a DALI batch error
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, j: int) -> tuple[np.ndarray, int, int, int]:
        """(encoded bytes or pixels, height, width, label) of source image ``j``; raises
        UnreadableImageError (PIL's message, as the torch loader's) for an unreadable file."""
        if not self.encoded:
            pixels = self.source.images[j].numpy()
            return pixels, pixels.shape[0], pixels.shape[1], self.source.targets[j]
        path, label = self.source.samples[j]
        if j in self.bad:
            self.source.load(j)  # raises the error it raised before
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                fmt = im.format
            ok = _complete(fmt, data)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            ok = False
        if not ok:
            self.source.load(j)  # PIL decodes it: raises as the torch loader would, or it is fine
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        return np.frombuffer(data, dtype=np.uint8), height, width, label

    def __getitem__(self, key: int | tuple[int, int | None]) -> tuple:
        position, seed = key if isinstance(key, tuple) else (key, None)
        (image, height, width, label), skipped = first_readable(
            self.source, self.indices, position, self.read, self.skip_corrupt, self._warned
        )
        return key, image, label, skipped, self.feeds(seed, height, width)

    def feeds(self, seed: int | None, height: int, width: int) -> dict[str, np.ndarray]:
        """The pipeline's per-sample inputs (see ``_train_view`` and ``_eval_view``)."""
        out: dict[str, np.ndarray] = {}
        train = [s for s in self.specs if isinstance(s, ViewSpec)]
        if train and seed is None:
            raise ValueError("DaliInputs: augmented views need (index, seed) keys (a seeded sampler)")
        params = iter(draw_sample(train, seed, height, width) if train else [])
        for v, spec in enumerate(self.specs):
            if isinstance(spec, EvalSpec):
                if spec.resize is None:
                    continue
                size, (top, left, h, w) = eval_geometry(spec, height, width)
                out[f"size{v}"] = np.array(size, dtype=np.float32)
                out[f"start{v}"] = np.array((top, left), dtype=np.int32)
                out[f"shape{v}"] = np.array((h, w), dtype=np.int32)
                continue
            p = next(params)
            out[f"start{v}"] = np.array((p.top, p.left), dtype=np.int32)
            out[f"shape{v}"] = np.array((p.height, p.width), dtype=np.int32)
            if spec.flip:
                out[f"flip{v}"] = np.array(int(p.flip), dtype=np.int32)
            if spec.jitter is not None:
                out[f"order{v}"] = np.array(jitter_slots(p.order, self.hue), dtype=np.int32)
                hue = hue_steps(p.hue) if self.hue == "pil" else hue_degrees(p.hue)
                out[f"factors{v}"] = np.array((p.brightness, p.contrast, p.saturation, hue), np.float32)
            if spec.gray_p is not None:
                out[f"gray{v}"] = np.array(p.gray)
            if spec.blur_p is not None:
                out[f"blur{v}"] = np.array(p.sigma is not None)
                k = (
                    np.ones((1, 1), np.float32)
                    if p.sigma is None
                    else pil_box_kernel(pil_box_radius(p.sigma))
                )
                out[f"kh{v}"], out[f"kv{v}"] = k, np.ascontiguousarray(k.T)
            if spec.solarize_p is not None:
                out[f"solarize{v}"] = np.array(p.solarize)
        return out


def jitter_slots(order: Sequence[int], hue: str = "pil") -> list[int]:
    """The pipeline's colour operations for torchvision's order of them (0 brightness, 1 contrast,
    2 saturation, 3 hue), padded with -1 (none) to ``len(jitter_slots)``: with ``hue`` "pil"
    the order itself (4 slots); with "yiq" saturation and hue become one operator at the place
    of the first of the two (3 slots)."""
    if hue == "pil":
        return list(order) + [-1] * (4 - len(order))
    ops: list[int] = []
    for i in order:
        op = min(i, _SATURATION_HUE)
        if op not in ops:
            ops.append(op)
    return ops + [-1] * (3 - len(ops))


def input_names(specs: Sequence[ViewSpec | EvalSpec]) -> dict[str, tuple[str, int]]:
    """Every per-sample pipeline input of these views: name → (DALI type name, ndim)."""
    out: dict[str, tuple[str, int]] = {}
    for v, spec in enumerate(specs):
        if isinstance(spec, EvalSpec) and spec.resize is None:
            continue
        if isinstance(spec, EvalSpec):
            out[f"size{v}"] = ("FLOAT", 1)
        out[f"start{v}"] = ("INT32", 1)
        out[f"shape{v}"] = ("INT32", 1)
        if isinstance(spec, EvalSpec):
            continue
        if spec.flip:
            out[f"flip{v}"] = ("INT32", 0)
        if spec.jitter is not None:
            out[f"order{v}"] = ("INT32", 1)
            out[f"factors{v}"] = ("FLOAT", 1)
        if spec.gray_p is not None:
            out[f"gray{v}"] = ("BOOL", 0)
        if spec.blur_p is not None:
            out[f"blur{v}"] = ("BOOL", 0)
            out[f"kh{v}"] = ("FLOAT", 2)
            out[f"kv{v}"] = ("FLOAT", 2)
        if spec.solarize_p is not None:
            out[f"solarize{v}"] = ("BOOL", 0)
    return out


# ----------------------------------------------------------------------------- pipeline
# The graph functions are traced by DALI's AutoGraph (``enable_conditionals``): an ``if`` on a
# DataNode becomes per-sample conditional execution, an ``if`` on a Python value stays Python.


def _ext(name: str, kind: str, ndim: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.external_source(name=name, dtype=getattr(types, kind), ndim=ndim)


def _u8(x):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.cast(x, dtype=types.UINT8)  # saturating: clips to [0, 255]


def _floor_u8(x):
    """PIL's rounding: a float image (non-negative where it matters) truncated and clipped to
    uint8. DALI rounds half away from zero when it converts, so rounding x − ½ is the floor."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.brightness_contrast(x, brightness_shift=_FLOOR_SHIFT, dtype=types.UINT8)


def _luma(x):
    """The luma (H, W, 1) uint8: ITU-R 601 weights rounded, as PIL's "L" (its 16-bit fixed point
    rounds a handful of pixels the other way)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)


def _contrast(x, factor, gpu: bool):
    """PIL's contrast: a blend with the mean of the luma rounded to an integer, m + f·(x − m),
    truncated and clipped. On the CPU one brightness_contrast operator (its centre is a
    per-sample argument, which DALI takes from the CPU only); on the GPU, where the mean is
    computed, the same expression in DALI arithmetic."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    centre = dmath.floor(fn.reductions.mean(_luma(x), dtype=types.FLOAT) + 0.5)
    if gpu:
        return _u8(dmath.floor(centre + factor * (x - centre)))
    return fn.brightness_contrast(
        x, contrast=factor, contrast_center=centre, brightness_shift=_FLOOR_SHIFT, dtype=types.UINT8
    )


def _pil_hue(x, steps, gpu: bool):
    """PIL's hue shift (torchvision's adjust_hue on a PIL image) in DALI arithmetic: RGB to
    PIL's 8-bit HSV (hue and saturation truncated to whole 1/255 steps), the hue moved by
    ``steps`` modulo 256, back to RGB rounding each channel. float32 where PIL mixes float and
    double: a value on a rounding boundary can come out one hue or saturation step away.

    HSV to RGB in closed form: channel k (n = 5, 3, 1 for R, G, B) is
    round(v·(1 − s·clamp(min(m, 4 − m), 0, 1))) with m = (n + 6h) mod 6, which is PIL's choice
    among v, p, q and t by the sextant of h.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    f = fn.cast(x, dtype=types.FLOAT)
    r, g, b = f[:, :, 0:1], f[:, :, 1:2], f[:, :, 2:3]
    maxc = dmath.max(r, dmath.max(g, b))
    cr = maxc - dmath.min(r, dmath.min(g, b))
    crs = dmath.max(cr, 1.0)  # grey pixels (cr = 0): hue and saturation 0, any finite h will do
    rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs
    is_r, is_g = r == maxc, g == maxc
    h = is_r * (bc - gc) + (1 - is_r) * (is_g * (2.0 + rc - bc) + (1 - is_g) * (4.0 + gc - rc))
    h = h / 6.0 + 1.0
    h = dmath.floor((h - dmath.floor(h)) * 255.0)  # PIL's uint8 hue
    s = dmath.floor(cr / dmath.max(maxc, 1.0) * 255.0) / 255.0  # PIL's uint8 saturation, / 255
    h = h + steps
    h = (h - 256.0 * dmath.floor(h / 256.0)) * 6.0 / 255.0  # the uint8 addition wraps at 256
    n = types.Constant(np.array([5.0, 3.0, 1.0], dtype=np.float32), device="gpu" if gpu else "cpu")
    m = n + h
    m = m - 6.0 * dmath.floor(m / 6.0)
    c = dmath.clamp(dmath.min(m, 4.0 - m), 0.0, 1.0)
    return _u8(dmath.floor(maxc * (1.0 - s * c) + 0.5))


def _colour_op(x, op, factors, gpu: bool, saturation: bool, hue: str):
    """One of the colour operations, chosen per sample by ``op`` (-1: none), clipped and
    truncated to uint8 after it as PIL does.

    ``hue`` "pil": saturation is DALI's ``hsv`` saturation (PIL's blend with the luma is DALI's
    scaling of I and Q in YIQ), hue is PIL's own 8-bit HSV shift (``_pil_hue``, some 60
    element-wise operations: cheap on a GPU, ~4 ms per 224-px view on a CPU core).
    ``hue`` "yiq": saturation and hue are one ``hsv`` operator, DALI's rotation of I and Q; it
    and PIL's HSV shift differ by several grey levels (train/README.md). Both keep the luma,
    so they commute with each other and with brightness and contrast (whose centre is the mean
    luma) but for the clipping and rounding that PIL does in between.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if op == _BRIGHTNESS:  # PIL: a blend with black, f·x
        x = fn.brightness_contrast(x, brightness=factors[0], brightness_shift=_FLOOR_SHIFT, dtype=types.UINT8)
    elif op == _CONTRAST:
        x = _contrast(x, factors[1], gpu)
    elif op == _SATURATION_HUE:
        if hue == "pil":  # saturation alone, truncated as PIL's blend
            x = _floor_u8(fn.hsv(x, saturation=factors[2], dtype=types.FLOAT))
        elif saturation:
            x = _floor_u8(fn.hsv(x, saturation=factors[2], hue=factors[3], dtype=types.FLOAT))
        else:
            x = fn.hsv(x, hue=factors[3], dtype=types.UINT8)
    elif op == _HUE:
        x = _pil_hue(x, factors[3], gpu)
    return x


def _train_view(image, spec: ViewSpec, v: int, gpu: bool, hue: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    x = _crop(image, v)
    x = fn.resize(x, size=[float(spec.size)] * 2, antialias=True, interp_type=types.INTERP_LINEAR)
    if spec.jitter is not None:
        order = _ext(f"order{v}", "INT32", 1)
        factors = _ext(f"factors{v}", "FLOAT", 1)
        saturation = len(spec.jitter) > 2 and spec.jitter[2] != 0
        for slot in range(4 if hue == "pil" else 3):
            x = _colour_op(x, order[slot], factors, gpu, saturation, hue)
    if spec.gray_p is not None:
        if _ext(f"gray{v}", "BOOL", 0):
            x = fn.color_space_conversion(_luma(x), image_type=types.GRAY, output_type=types.RGB)
    if spec.blur_p is not None:
        blur, kh, kv = _ext(f"blur{v}", "BOOL", 0), _ext(f"kh{v}", "FLOAT", 2), _ext(f"kv{v}", "FLOAT", 2)
        if blur:
            if gpu:  # the GPU filter takes its kernels from the GPU (they are fed from the CPU)
                kh, kv = kh.gpu(), kv.gpu()
            for kernel in (kh, kh, kh, kv, kv, kv):  # PIL: three box blurs along x, then three along y
                x = fn.filter(x, kernel, border="clamp")
    if spec.solarize_p is not None:
        if _ext(f"solarize{v}", "BOOL", 0):
            x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZED, dtype=types.UINT8)
    mirror = _ext(f"flip{v}", "INT32", 0) if spec.flip else 0
    return _normalize(x, spec, mirror)


def _eval_view(image, spec: EvalSpec, v: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    x = image
    if spec.resize is not None:
        x = fn.resize(x, size=_ext(f"size{v}", "FLOAT", 1), antialias=True, interp_type=types.INTERP_LINEAR)
        x = _crop(x, v)
    return _normalize(x, spec, 0)


def _crop(x, v: int):
    """The window ``start{v}`` (top, left), ``shape{v}`` (height, width) of each image."""
    import nvidia.dali.fn as fn

    return fn.slice(
        x, start=_ext(f"start{v}", "INT32", 1), shape=_ext(f"shape{v}", "INT32", 1), axis_names="HW"
    )


def _normalize(x, spec: ViewSpec | EvalSpec, mirror):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn.crop_mirror_normalize(
        x,
        mirror=mirror,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def _graph(specs: Sequence[ViewSpec | EvalSpec], encoded: bool, gpu: bool, hw_decoder_load: float, hue: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if encoded:
        data = fn.external_source(name="image", dtype=types.UINT8, ndim=1)
        kw = {"hw_decoder_load": hw_decoder_load, "jpeg_fancy_upsampling": True} if gpu else {}
        image = fn.decoders.image(
            data, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False, **kw
        )
    else:
        image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
        image = image.gpu() if gpu else image
    views = []
    for v, spec in enumerate(specs):
        if isinstance(spec, EvalSpec):
            views.append(_eval_view(image, spec, v))
        else:
            views.append(_train_view(image, spec, v, gpu, hue))
    return tuple(views)


def define_pipeline(
    specs: Sequence[ViewSpec | EvalSpec],
    batch_size: int,
    threads: int,
    device: torch.device,
    encoded: bool,
    hw_decoder_load: float = HW_DECODER_LOAD,
    hue: str = "pil",
):
    """A DALI pipeline of these views, fed per batch (``feed_input``), one batch in flight; not
    built yet (building a GPU one needs the GPU).

    On a CUDA ``device``: ``mixed`` decode (the hardware JPEG decoder takes ``hw_decoder_load``
    of the images where there is one), every operator on the GPU. Otherwise DALI's CPU
    operators (``device_id=None``). ``threads``: DALI's CPU threads. ``hue``: HUE_MODES.
    """
    if hue not in HUE_MODES:
        raise ValueError(f"hue must be one of {HUE_MODES}, got {hue!r}")
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"
    device_id = (torch.cuda.current_device() if device.index is None else device.index) if gpu else None
    make = pipeline_def(_graph, enable_conditionals=True)
    return make(
        specs,
        encoded,
        gpu,
        hw_decoder_load,
        hue,
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=True,
        exec_pipelined=True,
    )


# ----------------------------------------------------------------------------- loader


def _as_list(batch: list) -> list:
    return batch


@dataclass
class _Batch:
    samples: list  # (key, image, label, skipped, feeds) per sample


class DaliLoader:
    """Batches like the torch DataLoader's over a ``ViewDataset``: ``(views, labels, skipped)``,
    ``views`` a list of (B, 3, S, S) float32 tensors (on the GPU with a CUDA ``device``).

    Args:
        source: the images (an ImageFolder split or digits).
        specs: the views of a sample (``ViewSpec``s need seeded keys, ``EvalSpec``s do not).
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        sampler: yields the keys, ``(position, seed)`` or positions; default all positions in order.
        indices: the source indices that positions refer to (default all).
        skip_corrupt: replace unreadable images by the next readable one (counted) instead of raising.
        workers: processes that read the files and draw the parameters (0: this process).
        threads: DALI's CPU threads (default ``max(1, workers)``).
        device: where the pipeline runs and the batches are delivered.
        hw_decoder_load: share of the JPEGs for the GPU's hardware decoder (``mixed`` decode).
        hue: "pil" (PIL's 8-bit HSV shift, as the torch loader) or "yiq" (DALI's faster rotation
            in YIQ, several grey levels away from it; see ``_colour_op``).
    """

    def __init__(
        self,
        source: FolderSource | DigitsSource,
        specs: Sequence[ViewSpec | EvalSpec],
        batch_size: int,
        sampler: Iterable | None = None,
        indices: Sequence[int] | None = None,
        skip_corrupt: bool = False,
        workers: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        hw_decoder_load: float = HW_DECODER_LOAD,
        threads: int | None = None,
        hue: str = "pil",
    ) -> None:
        require_dali()
        if hue not in HUE_MODES:
            raise UsageError(f"--dali-hue must be one of {', '.join(HUE_MODES)}, got {hue!r}")
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise UsageError(f"--dali-hw-decoder-load must be in [0, 1], got {hw_decoder_load}")
        self.inputs = DaliInputs(source, specs, indices, skip_corrupt, hue)
        self.hue = hue
        self.specs = list(specs)
        self.batch_size = batch_size
        self.sampler = sampler
        self.device = torch.device(device)
        self.threads = max(1, workers) if threads is None else threads
        self.hw_decoder_load = hw_decoder_load
        self.drop_last = drop_last
        self.names = input_names(self.specs)
        self.prepare = DataLoader(
            self.inputs,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_as_list,
            drop_last=drop_last,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self._pipe = None
        self._in_flight: _Batch | None = None

    def __len__(self) -> int:
        return len(self.prepare)

    # -- the pipeline

    def _pipeline(self):
        if self._pipe is None:
            encoded = self.inputs.encoded
            self._pipe = define_pipeline(
                self.specs,
                self.batch_size,
                self.threads,
                self.device,
                encoded,
                self.hw_decoder_load,
                self.hue,
            )
            self._pipe.build()
        return self._pipe

    def _submit(self, batch: _Batch) -> None:
        pipe = self._pipeline()
        _, images, _, _, feeds = zip(*batch.samples, strict=True)
        pipe.feed_input("image", list(images), layout=None if self.inputs.encoded else "HWC")
        for name in self.names:
            pipe.feed_input(name, [f[name] for f in feeds])
        pipe.schedule_run()
        self._in_flight = batch

    def _collect(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The outputs of the batch in flight; after a DALI error, the batch again without the
        files PIL cannot read (or the error, naming the batch's files, when PIL reads them all)."""
        batch = self._in_flight
        while True:
            try:
                outputs = self._pipe.outputs()
                break
            except RuntimeError as err:
                self._pipe = None  # DALI invalidates a pipeline after an error
                self._in_flight = None
                batch = self._after_error(batch, err)
                self._submit(batch)
        self._in_flight = None
        views = [self._to_torch(out) for out in outputs]
        _, _, labels, skipped, _ = zip(*batch.samples, strict=True)
        return views, torch.tensor(labels, dtype=torch.int64), torch.tensor(skipped, dtype=torch.int64)

    def _after_error(self, batch: _Batch, err: Exception) -> _Batch:
        inputs, src = self.inputs, self.inputs.source
        keys = [sample[0] for sample in batch.samples]
        files = [inputs.indices[(k[0] if isinstance(k, tuple) else k) % len(inputs.indices)] for k in keys]
        found = []  # unreadable files of the batch (also ones known before: worker processes
        for j in files:  # prepare samples with their own copy of ``bad``)
            if not isinstance(src, FolderSource):
                continue
            if j in inputs.bad:
                found.append(j)
                continue
            try:
                src.load(j)
            except UnreadableImageError:
                inputs.bad.add(j)
                found.append(j)
        if not found:
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise RunError(
                f"--loader dali: DALI failed on a batch of images that PIL reads "
                f"({', '.join(src.name(j) for j in files[:3])}{more}): {lines[-1] if lines else err}; "
                "--loader torch reads them"
            ) from None
        return _Batch([inputs[k] for k in keys])

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        dst = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, dst, cuda_stream=stream)  # on the GPU: a device copy on torch's stream
        return dst

    def _drain(self) -> None:
        """Consume a batch left in flight by an iteration that stopped early."""
        if self._in_flight is not None:
            try:
                self._pipe.outputs()
            except RuntimeError:
                self._pipe = None
            self._in_flight = None

    # -- iteration

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        self._drain()
        try:
            for samples in self.prepare:
                batch = _Batch(samples)
                if self._in_flight is None:
                    self._submit(batch)
                    continue
                done = self._collect()
                self._submit(batch)  # DALI works on the next batch while this one is used
                yield done
            if self._in_flight is not None:
                yield self._collect()
        finally:
            self._drain()
