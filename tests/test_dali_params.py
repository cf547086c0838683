"""The DALI loader's augmentation parameters are torchvision's: ``train.dali.draw_sample`` draws,
from a sample's seed, the very numbers that the torch loader's transforms draw from it.

Checked through the pixels: the views that torchvision's functional kernels make with the drawn
parameters must equal, bit for bit, the views the torch loader's transforms make from the same
seed. A parameter drawn differently (a crop, a flip, a jitter factor or its order, a grey, blur or
solarise decision, a σ), or a generator left in another state for the next view, changes pixels.
Pure Python (PIL and torchvision): runs without DALI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from PIL import Image, ImageFilter  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from train import data as tdata  # noqa: E402
from train.dali import ViewParams, draw_sample, eval_geometry, hue_steps, jitter_slots  # noqa: E402
from train.data import EvalSpec, ViewSpec  # noqa: E402


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A colourful RGB image: smooth colour ramps plus noise (hue and saturation matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    ramp = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + 30
    return Image.fromarray(np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8))


def apply(image: Image.Image, spec: ViewSpec, p: ViewParams) -> torch.Tensor:
    """One view from explicit parameters with torchvision's functional kernels (and PIL's blur)."""
    x = F.resized_crop(image, p.top, p.left, p.height, p.width, [spec.size, spec.size], antialias=True)
    if p.flip:
        x = F.horizontal_flip(x)
    adjust = {
        0: lambda im: F.adjust_brightness(im, p.brightness),
        1: lambda im: F.adjust_contrast(im, p.contrast),
        2: lambda im: F.adjust_saturation(im, p.saturation),
        3: lambda im: F.adjust_hue(im, p.hue),
    }
    for op in p.order:
        x = adjust[op](x)
    if p.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.sigma is not None:
        x = x.filter(ImageFilter.GaussianBlur(radius=p.sigma))
    if p.solarize:
        x = F.solarize(x, threshold=128)
    t = F.to_dtype(F.to_image(x), torch.float32, scale=True)
    return F.normalize(t, list(spec.mean), list(spec.std))


EVERYTHING = ViewSpec(
    20, (0.08, 1.0), flip=True, jitter=(0.4, 0.4, 0.2, 0.1), gray_p=0.5, blur_p=0.5, solarize_p=0.5
)
RECIPES = {
    "byol": tdata.pretrain_specs(24, False, False),
    "multicrop": tdata.pretrain_specs(24, True, False),
    "digits byol": tdata.pretrain_specs(16, False, True),
    "digits multicrop": tdata.pretrain_specs(16, True, True),
    "classifier": [tdata.classifier_spec(24, False)],
    "every branch": [EVERYTHING, EVERYTHING],
}
# (width, height): landscape, portrait, and one so elongated that RandomResizedCrop's ten tries
# at scale >= 0.2 all fail and it takes its fallback centre crop.
SHAPES = [(41, 30), (23, 37), (90, 7)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_drawn_parameters_make_the_torch_loaders_views(recipe):
    specs = RECIPES[recipe]
    transforms = [tdata.torch_view(s) for s in specs]
    seen = set()
    for k, (w, h) in enumerate(SHAPES):
        image = picture(w, h, k)
        for seed in range(12 if recipe == "every branch" else 6):
            seed = tdata.sample_seed(5, k, seed)
            params = draw_sample(specs, seed, h, w)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected = [t(image) for t in transforms]
            for spec, p, want in zip(specs, params, expected, strict=True):
                assert torch.equal(apply(image, spec, p), want), (recipe, seed, p)
                seen.update(name for name in ("flip", "gray", "solarize") if getattr(p, name))
                seen.update({"blur"} if p.sigma is not None else set())
                seen.update({"jitter"} if p.order else set())
                seen.update({"fallback"} if (p.height, p.width) == (7, 9) else set())
    if recipe == "every branch":  # the comparison above went through every kind of parameter
        assert seen >= {"flip", "gray", "solarize", "blur", "jitter", "fallback"}, seen


def test_parameters_depend_on_the_seed_alone():
    # Draws use a generator of their own: the global one neither matters nor moves.
    specs = tdata.pretrain_specs(24, True, False)
    torch.manual_seed(1)
    a = draw_sample(specs, 123, 40, 50)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    torch.rand(7)
    b = draw_sample(specs, 123, 40, 50)
    assert a == b
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert draw_sample(specs, 124, 40, 50) != a


def test_eval_geometry_is_torchvisions_resize_and_centre_crop():
    spec = EvalSpec(24, 27)
    for w, h in [(41, 30), (23, 37), (30, 30), (90, 7)]:
        image = picture(w, h, 0)
        (nh, nw), (top, left, ch, cw) = eval_geometry(spec, h, w)
        resized = F.resize(image, 27, antialias=True)
        assert resized.size == (nw, nh)
        cropped = F.crop(resized, top, left, ch, cw)
        assert np.array_equal(np.asarray(cropped), np.asarray(F.center_crop(resized, 24)))


def test_jitter_slots():
    # 0 brightness, 1 contrast, 2 saturation, 3 hue. "pil": torchvision's order, four slots;
    # "yiq": saturation and hue run as one operator (slot 2) where the first of the two is.
    assert jitter_slots((3, 0, 2, 1)) == [3, 0, 2, 1]
    assert jitter_slots((1, 0)) == [1, 0, -1, -1]
    assert jitter_slots((3, 0, 2, 1), "yiq") == [2, 0, 1]
    assert jitter_slots((1, 0), "yiq") == [1, 0, -1]
    assert jitter_slots((2, 1, 3, 0), "yiq") == [2, 1, 0]
    assert jitter_slots((), "yiq") == [-1, -1, -1]


def test_hue_steps_wrap_as_torchvisions_uint8_addition():
    # torchvision: np_h += np.int32(hue_factor * 255).astype(np.uint8) on PIL's uint8 hue.
    for hue in (-0.5, -0.1, -0.0041, 0.0, 0.0039, 0.1, 0.5):
        h = np.arange(256, dtype=np.uint8)
        want = h + np.int32(hue * 255).astype(np.uint8)
        assert np.array_equal((h.astype(int) + hue_steps(hue)) % 256, want), hue
