"""Datasets that teach: synthetic shapes and textures, real offline data.

Everything here runs offline. ``synthetic_images`` draws labelled pictures
of shapes or textures in several *domains* (renderings of the same
classes): ``photo`` is colourful and photo-like, close to what ImageNet
models saw; ``sketch`` is black line drawings on white; ``noisy_gray`` is
grayscale under heavy noise; ``silhouette`` is flat dark shapes on white.
Image ``i`` depends only on the seed, the kind, the domain, the controls
and ``i``, so the same call gives the same bytes in every process (and on
every machine with the same numpy and Pillow), and the pictures are drawn
when they are read, so DataLoader workers can share the work.

``synthetic_text`` draws labelled topic sentences whose test split uses
key words and phrasings never seen in training, so that what a pretrained
text encoder brings can be measured.

``digits`` (scikit-learn's handwritten digits) and ``sample_photos``
(scikit-image's photos) ship with installed packages. ``image_folder``
loads a learner's own photos with checks that explain what is wrong.
``download`` fetches an optional archive, verified by its sha256.
"""

import colorsys
import copy
import difflib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from tlhelpers import config, files

KINDS = ("shapes", "textures")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon",
          "heart", "arrow", "diamond", "crescent", "semicircle")
TEXTURES = ("stripes", "checkerboard", "dots", "waves", "grid", "zigzag",
            "concentric", "bricks", "spiral", "speckles")
DOMAINS = ("photo", "sketch", "noisy_gray", "silhouette")
BACKGROUNDS = ("solid", "gradient", "clouds")
CONTROLS = ("backgrounds", "colours", "noise", "rotation", "scale")

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024
# Items a SyntheticImages fingerprint draws: enough to notice a change in
# the drawing code, cheap next to a backbone's forward pass.
SAMPLED_ITEMS = 8

# Noise (standard deviation, on a 0-1 pixel scale) when `noise` is not given.
_DOMAIN_NOISE = MappingProxyType(
    {"photo": 0.03, "sketch": 0.0, "noisy_gray": 0.3, "silhouette": 0.0})
# Largest rotation (degrees, either way) when `rotation` is not given.
# Shapes stay roughly upright, like objects in photos; a texture has no
# upright, so any orientation goes.
_KIND_ROTATION = MappingProxyType({"shapes": 30.0, "textures": 180.0})
# Size range when `scale` is not given: the shape's radius as a fraction
# of half the image, or the texture's period as a fraction of the image.
_KIND_SCALE = MappingProxyType(
    {"shapes": (0.55, 0.9), "textures": (0.12, 0.22)})

# Folder names that mean a data split, not a class.
_SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation",
                          "test", "testing"})
# Image formats image_folder() reads: torchvision's list, plus GIF.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp", ".gif")


# ---------------------------------------------------------- arguments


def check_int(value: Any, name: str, low: int | None = None,
              high: int | None = None, why: str = "",
              error: type[Exception] = ValueError) -> int:
    """Return value if it is an int (not a bool) in [low, high]; else raise.

    The message names the argument and its range, then adds `why`.
    """
    if (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low)
            and (high is None or value <= high)):
        return value
    if low is not None and high is not None:
        bounds = f" from {low} to {high}"
    elif low is not None:
        bounds = f" >= {low}"
    else:
        bounds = "" if high is None else f" <= {high}"
    raise error(f"{name} must be an int{bounds}, got {value!r}{why}")


# ------------------------------------------------------------ datasets


def _targets_of(dataset, caller):
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(
            f"{caller} needs a dataset with .targets (one class index per "
            f"item), got {type(dataset).__name__}; use synthetic_images(), "
            "digits(), image_folder() or a LabelledSubset")
    return [int(t) for t in targets]


class LabelledImages(Dataset):
    """A list of PIL images with labels, class names and a transform."""

    def __init__(self, images, targets, classes, transform=None):
        if len(images) != len(targets):
            raise ValueError(f"got {len(images)} images but {len(targets)} "
                             "targets; give one target per image")
        self.images = list(images)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def fingerprint(self) -> list:
        """Return what the items depend on (for the feature cache)."""
        return [self.targets, self.images]

    def __repr__(self):
        return (f"LabelledImages({len(self)} images, "
                f"classes={self.classes})")


class LabelledSubset(Dataset):
    """Part of a dataset, chosen by index, that keeps .classes and .targets."""

    def __init__(self, dataset, indices):
        targets = _targets_of(dataset, "LabelledSubset")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.classes = list(dataset.classes)
        self.targets = [targets[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]

    def fingerprint(self) -> list:
        """Return what the items depend on: the indices, the dataset."""
        return [self.indices, self.dataset]

    def __repr__(self):
        return (f"LabelledSubset({len(self)} of {len(self.dataset)} items, "
                f"classes={self.classes})")


class _Transformed(Dataset):
    """Apply a transform on top of a dataset we cannot reach inside."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform
        self.classes = list(dataset.classes)
        self.targets = _targets_of(dataset, "with_transform")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def fingerprint(self) -> list:
        """Return what the items depend on: the dataset below."""
        return [self.dataset]


def with_transform(dataset: Dataset, transform: Callable | None) -> Dataset:
    """Return the dataset with a new transform; the original is unchanged.

    The new transform replaces the old one (it is not stacked on top), so
    the same images can be fed to models with different preprocessing.
    """
    if isinstance(dataset, LabelledSubset):
        return LabelledSubset(with_transform(dataset.dataset, transform),
                              dataset.indices)
    if isinstance(dataset, _Transformed):
        return _Transformed(dataset.dataset, transform)
    if hasattr(dataset, "transform"):
        new = copy.copy(dataset)
        new.transform = transform
        # torchvision datasets also keep a combined `transforms` object
        if hasattr(new, "transforms") and hasattr(new, "target_transform"):
            from torchvision.datasets.vision import StandardTransform

            new.transforms = StandardTransform(transform,
                                               new.target_transform)
        return new
    return _Transformed(dataset, transform)


def few_shot(dataset: Any, k: int, seed: int = 0) -> LabelledSubset:
    """Keep k randomly chosen examples of every class (stratified)."""
    check_int(k, "k (examples per class)", low=1)
    targets = np.asarray(_targets_of(dataset, "few_shot"))
    rng = np.random.default_rng(seed)
    chosen = []
    for c, name in enumerate(dataset.classes):
        members = np.flatnonzero(targets == c)
        if len(members) < k:
            raise ValueError(
                f"class {name!r} has only {len(members)} examples, fewer "
                f"than k={k}; lower k or use a dataset with more images "
                "per class")
        chosen.extend(rng.choice(members, size=k, replace=False).tolist())
    return LabelledSubset(dataset, sorted(chosen))


def train_val_split(dataset: Any, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[LabelledSubset, LabelledSubset]:
    """Split into (train, val) with every class in the same proportion."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 "
                         f"(exclusive), got {val_fraction!r}")
    targets = np.asarray(_targets_of(dataset, "train_val_split"))
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c, name in enumerate(dataset.classes):
        members = rng.permutation(np.flatnonzero(targets == c))
        if len(members) == 0:
            continue
        if len(members) < 2:
            raise ValueError(
                f"class {name!r} has only {len(members)} example; a split "
                "needs at least 2 per class (one for each side)")
        n_val = int(round(len(members) * val_fraction))
        n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return (LabelledSubset(dataset, sorted(train)),
            LabelledSubset(dataset, sorted(val)))


def make_loaders(*datasets: Any, batch_size: int = 32,
                 num_workers: int = 0, shuffle_first: bool = True,
                 seed: int = 0) -> tuple[DataLoader, ...]:
    """Wrap datasets in DataLoaders; only the first one is shuffled.

    Defaults suit a CPU laptop or Binder: no worker processes unless asked
    for, and pinned memory only when a CUDA GPU is there to use it. The
    shuffle order is seeded, so a run can be repeated.

    Returns:
        a tuple with one DataLoader per dataset, in the same order.
    """
    if not datasets:
        raise ValueError("make_loaders needs at least one dataset, e.g. "
                         "make_loaders(train, val)")
    check_int(batch_size, "batch_size", low=1)
    check_int(num_workers, "num_workers", low=0)
    for position, ds in enumerate(datasets):
        if len(ds) == 0:
            raise ValueError(f"dataset {position} is empty")
        sample = ds[0][0]
        if isinstance(sample, Image.Image):
            raise TypeError(
                f"dataset {position} yields PIL images, which cannot be "
                "batched; give it the model's preprocessing first, e.g. "
                "with_transform(dataset, pretrained.transform)")
        if isinstance(sample, str):
            raise TypeError(
                f"dataset {position} yields sentences (str), which cannot "
                "be batched; give it the model's tokenizer first, e.g. "
                "with_transform(dataset, pretrained.transform)")
    pin = torch.cuda.is_available()
    loaders = []
    for position, ds in enumerate(datasets):
        shuffle = shuffle_first and position == 0
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        loaders.append(DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle,
            num_workers=num_workers, pin_memory=pin, generator=generator,
            persistent_workers=num_workers > 0))
    return tuple(loaders)


# ----------------------------------------------------- synthetic images


def _stable_int(*parts):
    text = repr(parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def _regular(n, radius=1.0, phase=-np.pi / 2):
    angles = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


def _shape_polygons(name):
    """Return a shape's outline (then its holes), centred, radius 1, y down.

    Centring on the bounding box and scaling to radius 1 makes every shape
    fill the same circle, so size alone never gives the class away.
    """
    polys = _raw_polygons(name)
    lo, hi = polys[0].min(0), polys[0].max(0)
    centre = (lo + hi) / 2
    radius = np.linalg.norm(polys[0] - centre, axis=1).max()
    return [(p - centre) / radius for p in polys]


def _raw_polygons(name):
    if name == "circle":
        return [_regular(64, 0.95)]
    if name == "square":
        return [_regular(4, 1.0, np.pi / 4)]
    if name == "triangle":
        tri = _regular(3, 1.0)
        return [tri]
    if name == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, -np.pi / 2
                                                  + np.pi / 5)
        star = np.empty((10, 2))
        star[0::2], star[1::2] = outer, inner
        return [star]
    if name == "cross":
        a, w = 0.95, 0.3
        return [np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w],
                          [w, w], [w, a], [-w, a], [-w, w], [-a, w],
                          [-a, -w], [-w, -w]])]
    if name == "ring":
        return [_regular(64, 0.95), _regular(64, 0.55)]
    if name == "hexagon":
        return [_regular(6, 1.0, 0.0)]
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t)
              - np.cos(4 * t))
        return [np.stack([x, y], 1)]
    if name == "arrow":
        return [np.array([[-0.95, -0.2], [0.15, -0.2], [0.15, -0.6],
                          [0.95, 0.0], [0.15, 0.6], [0.15, 0.2],
                          [-0.95, 0.2]])]
    if name == "diamond":
        return [np.array([[0, -1.0], [0.6, 0], [0, 1.0], [-0.6, 0]])]
    if name == "crescent":
        # outer circle minus a circle shifted right, traced as one outline
        r1, r2, d = 0.95, 0.8, 0.45
        x = (d * d + r1 * r1 - r2 * r2) / (2 * d)
        y = np.sqrt(r1 * r1 - x * x)
        alpha, beta = np.arctan2(y, x), np.arctan2(y, x - d)
        outer = np.linspace(alpha, 2 * np.pi - alpha, 40)
        inner = np.linspace(2 * np.pi - beta, beta, 32)
        pts = np.concatenate([
            np.stack([r1 * np.cos(outer), r1 * np.sin(outer)], 1),
            np.stack([d + r2 * np.cos(inner), r2 * np.sin(inner)], 1)])
        return [pts]
    if name == "semicircle":
        t = np.linspace(0, np.pi, 40)
        return [np.stack([np.cos(t), -np.sin(t)], 1)]
    raise ValueError(f"unknown shape {name!r}")


def _wobble(poly, rng, amount):
    """Subdivide an outline and bend it a little, like a hand-drawn line."""
    closed = np.concatenate([poly, poly[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    steps = np.maximum(1, np.ceil(seg / 0.15).astype(int))
    pts = [closed[i] + (closed[i + 1] - closed[i]) * (j / steps[i])
           for i in range(len(poly)) for j in range(steps[i])]
    pts = np.asarray(pts)
    s = np.linspace(0, 2 * np.pi, len(pts), endpoint=False)
    f = rng.integers(2, 5, size=2)
    ph = rng.uniform(0, 2 * np.pi, size=4)
    dx = np.sin(f[0] * s + ph[0]) + 0.5 * np.sin(2 * f[1] * s + ph[1])
    dy = np.sin(f[1] * s + ph[2]) + 0.5 * np.sin(2 * f[0] * s + ph[3])
    return pts + amount * np.stack([dx, dy], 1)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _parse_colour(value):
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)[:3]
        except ValueError:
            raise ValueError(
                f"unknown colour {value!r}; use a name like 'red', a hex "
                "code like '#ff8800' or an (r, g, b) tuple of 0-255 "
                "values") from None
        return tuple(int(c) for c in rgb)
    try:
        rgb = tuple(value)
    except TypeError:
        rgb = ()
    if (len(rgb) != 3 or not all(isinstance(c, (int, np.integer))
                                 for c in rgb)
            or not all(0 <= c <= 255 for c in rgb)):
        raise ValueError(f"a colour must be a name, a hex code or an "
                         f"(r, g, b) tuple of 0-255 integers, got "
                         f"{value!r}")
    return tuple(int(c) for c in rgb)


def _check_controls(kind, domain, controls):
    """Validate the drawing controls and fill in the defaults."""
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, CONTROLS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"unknown control {name!r}{hint}; valid controls: "
                        f"{', '.join(CONTROLS)}")
    colours = controls.get("colours")
    if colours is not None:
        if isinstance(colours, str) or (
                len(colours) == 3
                and all(isinstance(c, (int, np.integer)) for c in colours)):
            colours = [colours]  # one colour, not a list of them
        if len(colours) == 0:
            raise ValueError("colours must list at least one colour, or be "
                             "None for random colours")
        colours = tuple(_parse_colour(c) for c in colours)
    backgrounds = controls.get("backgrounds")
    if backgrounds is None:
        backgrounds = BACKGROUNDS
    elif isinstance(backgrounds, str):
        backgrounds = (backgrounds,)
    backgrounds = tuple(backgrounds)
    bad = [b for b in backgrounds if b not in BACKGROUNDS]
    if bad or not backgrounds:
        raise ValueError(f"unknown background {bad[0] if bad else None!r}; "
                         f"choose from: {', '.join(BACKGROUNDS)}")
    noise = controls.get("noise")
    noise = _DOMAIN_NOISE[domain] if noise is None else noise
    if not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
        raise ValueError(f"noise is a standard deviation on a 0-1 pixel "
                         f"scale and must be in [0, 1], got {noise!r}")
    rotation = controls.get("rotation")
    rotation = _KIND_ROTATION[kind] if rotation is None else rotation
    if not isinstance(rotation, (int, float)) or not 0 <= rotation <= 180:
        raise ValueError(f"rotation is the largest turn in degrees (either "
                         f"way) and must be in [0, 180], got {rotation!r}")
    scale = controls.get("scale")
    scale = _KIND_SCALE[kind] if scale is None else scale
    if isinstance(scale, (int, float)):
        scale = (scale, scale)
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        lo = hi = -1.0
    if not 0.05 <= lo <= hi <= 1:
        raise ValueError(f"scale must be a number or a (min, max) pair with "
                         f"0.05 <= min <= max <= 1, got {scale!r}")
    return {"backgrounds": backgrounds, "colours": colours,
            "noise": float(noise), "rotation": float(rotation),
            "scale": (lo, hi)}


def _check_classes(kind, classes):
    names = SHAPES if kind == "shapes" else TEXTURES
    if isinstance(classes, int) and not isinstance(classes, bool):
        if not 2 <= classes <= len(names):
            raise ValueError(
                f"classes must be between 2 and {len(names)} for "
                f"kind={kind!r}, got {classes}; available: "
                f"{', '.join(names)}")
        return list(names[:classes])
    if isinstance(classes, (str, bool)) or classes is None:
        raise TypeError(f"classes must be a number of classes or a list of "
                        f"names from {', '.join(names)}; got {classes!r}")
    classes = list(classes)
    for c in classes:
        if c not in names:
            raise ValueError(f"unknown {kind[:-1]} class {c!r}; choose from: "
                             f"{', '.join(names)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes lists a name twice: {classes}")
    if len(classes) < 2:
        raise ValueError(f"a classification task needs at least 2 classes, "
                         f"got {classes}")
    return classes


class SyntheticImages(Dataset):
    """Procedurally drawn, labelled images of shapes or textures.

    Built by synthetic_images(); items are (image, class index) where the
    image is an RGB PIL image, or whatever `transform` makes of it. Classes
    are balanced and interleaved: item i shows class i % len(classes).
    """

    def __init__(self, kind, classes, n_per_class, image_size, domain, seed,
                 transform, controls):
        self.kind = kind
        self.classes = list(classes)
        self.n_per_class = n_per_class
        self.image_size = image_size
        self.domain = domain
        self.seed = seed
        self.transform = transform
        self.controls = controls
        k = len(self.classes)
        self.targets = [i % k for i in range(k * n_per_class)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.render(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self):
        return (f"SyntheticImages(kind={self.kind!r}, "
                f"domain={self.domain!r}, classes={self.classes}, "
                f"n_per_class={self.n_per_class}, "
                f"image_size={self.image_size}, seed={self.seed})")

    def fingerprint(self) -> list:
        """Return what the items depend on (for the feature cache).

        Items are drawn from the parameters; a few drawn images catch a
        change in the drawing code itself.
        """
        step = max(1, len(self) // SAMPLED_ITEMS)
        drawn = [self.render(i)
                 for i in range(0, len(self), step)[:SAMPLED_ITEMS]]
        return [[self.kind, self.domain, self.classes, self.n_per_class,
                 self.image_size, self.seed, sorted(self.controls.items())],
                drawn]

    def _rng_for(self, index):
        """Return the random generator that draws item `index`."""
        k = len(self.classes)
        name, j = self.classes[index % k], index // k
        # The image size is left out on purpose: the same seed gives the
        # same picture at every resolution.
        c = self.controls
        key = _stable_int(self.kind, self.domain, name, c["backgrounds"],
                          c["colours"], c["noise"], c["rotation"],
                          c["scale"])
        ss = np.random.SeedSequence([self.seed, key & 0xFFFFFFFF,
                                     key >> 32, j])
        return np.random.default_rng(ss)

    def render(self, index: int) -> Image.Image:
        """Draw item `index` as an RGB PIL image (no transform)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for "
                             f"{len(self)} images")
        index = index % len(self)
        rng = self._rng_for(index)
        name = self.classes[index % len(self.classes)]
        size = self.image_size
        sketch = self.domain == "sketch"
        if self.kind == "shapes":
            cover = _draw_shape(name, size, rng, self.controls, sketch)
        else:
            cover = _draw_texture(name, size, rng, self.controls, sketch)
        pixels = _compose(cover, self.domain, rng, self.controls,
                          shadow=self.kind == "shapes")
        return Image.fromarray(pixels)


def _draw_shape(name, size, rng, controls, sketch):
    """Return a [size, size] float32 coverage map (1 = shape or line)."""
    lo, hi = controls["scale"]
    radius = rng.uniform(lo, hi)
    angle = np.deg2rad(rng.uniform(-1, 1) * controls["rotation"])
    stretch = rng.uniform(0.9, 1.1)
    room = max(0.0, 1.0 - radius)
    centre = rng.uniform(-room, room, size=2) * 0.9
    wobble = rng.uniform(0.008, 0.02) if sketch else 0.0
    width = rng.uniform(0.8, 1.4)
    polys = _shape_polygons(name)
    if sketch:
        polys = [_wobble(p, rng, wobble) for p in polys]
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, sin], [-sin, cos]]) * [[stretch], [1 / stretch]]
    # Draw at twice the size and shrink: cheap anti-aliasing.
    ss = 2 if size <= 256 else 1
    big = size * ss
    half = big / 2
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for n, poly in enumerate(polys):
        pts = ((poly @ rot) * radius + centre) * half + half
        xy = [tuple(p) for p in pts.tolist()]
        if sketch:
            line = max(1, round(width * big / 40))
            draw.line(xy + xy[:1], fill=255, width=line, joint="curve")
        else:
            draw.polygon(xy, fill=0 if n else 255)
    if ss > 1:
        mask = mask.reduce(ss)
    return np.asarray(mask, dtype=np.float32) * (1 / 255)


def _pixel_coords(size):
    c = (size - 1) / 2
    axis = np.arange(size, dtype=np.float32) - c
    return axis[None, :], axis[:, None]


def _band(t, period, width):
    """Signed distance (pixels) to bands of `width` repeating every period."""
    t = np.mod(t, period) - period / 2
    return width / 2 - np.abs(t)


def _texture_distance(name, size, rng, controls):
    """Return a signed distance field: > 0 inside the pattern's ink."""
    lo, hi = controls["scale"]
    p = rng.uniform(lo, hi) * size
    angle = np.deg2rad(rng.uniform(-1, 1) * controls["rotation"])
    x, y = _pixel_coords(size)
    x = x + rng.uniform(-p, p)
    y = y + rng.uniform(-p, p)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = x * cos + y * sin
    v = y * cos - x * sin
    if name == "stripes":
        return _band(u, p, p * rng.uniform(0.4, 0.6))
    if name == "checkerboard":
        du, dv = _band(u, p, p / 2), _band(v, p, p / 2)
        return np.where(du * dv < 0, 1, -1) * np.minimum(np.abs(du),
                                                         np.abs(dv))
    if name == "dots":
        tu = np.mod(u, p) - p / 2
        tv = np.mod(v, p) - p / 2
        return p * rng.uniform(0.22, 0.32) - np.sqrt(tu * tu + tv * tv)
    if name == "grid":
        w = max(1.5, p * rng.uniform(0.12, 0.2))
        return np.maximum(_band(u, p, w), _band(v, p, w))
    if name == "waves":
        amp, length = p * rng.uniform(0.2, 0.35), p * rng.uniform(1.5, 2.5)
        bend = amp * np.sin(v * np.float32(2 * np.pi / length))
        return _band(u + bend, p, p * 0.5)
    if name == "zigzag":
        amp, length = p * rng.uniform(0.25, 0.4), p * rng.uniform(1.2, 2.0)
        tri = np.abs(np.mod(v / np.float32(length), 1) - 0.5) * 4 - 1
        return _band(u + amp * tri, p, p * 0.5)
    if name == "concentric":
        cx, cy = rng.uniform(-0.3, 0.3, size=2) * size
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return _band(r, p, p * 0.5)
    if name == "bricks":
        p = p * 1.5  # a brick is one period long and half a period high
        w = max(1.5, p * rng.uniform(0.07, 0.11))
        row = np.floor(v / np.float32(p / 2))
        shifted = u + np.mod(row, 2) * np.float32(p / 2)
        # mortar lines sit where a row (or a brick) ends
        return np.maximum(_band(v + p / 4, p / 2, w),
                          _band(shifted + p / 2, p, w))
    if name == "spiral":
        cx, cy = rng.uniform(-0.2, 0.2, size=2) * size
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        theta = np.arctan2(y - cy, x - cx)
        turn = np.float32(p / (2 * np.pi)) * rng.choice([-1, 1])
        return _band(r + turn * theta, p, p * 0.5)
    if name == "speckles":
        # one dot per cell of a lattice, at a random place and size
        cells = int(size / p) + 3
        off = rng.uniform(0.2, 0.8, size=(2, cells, cells)).astype(np.float32)
        rad = rng.uniform(0.12, 0.3, size=(cells, cells)).astype(np.float32)
        iu = np.clip(np.floor(u / p).astype(int) + cells // 2, 0, cells - 1)
        iv = np.clip(np.floor(v / p).astype(int) + cells // 2, 0, cells - 1)
        tu = np.mod(u, p) - off[0][iv, iu] * p
        tv = np.mod(v, p) - off[1][iv, iu] * p
        return rad[iv, iu] * p - np.sqrt(tu * tu + tv * tv)
    raise ValueError(f"unknown texture {name!r}")


def _draw_texture(name, size, rng, controls, sketch):
    """Return a [size, size] float32 coverage map of a texture."""
    d = _texture_distance(name, size, rng, controls).astype(np.float32)
    if sketch:
        # ink along the pattern's edges, about 1.5 pixels wide at 64 px
        width = max(1.0, size / 40 * rng.uniform(0.8, 1.3))
        d = width / 2 - np.abs(d)
    return np.clip(d + 0.5, 0, 1)


def _background(kind, size, rng, base, other):
    """Return a [size, size, 3] background between two colours."""
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3))
    if kind == "gradient":
        x, y = _pixel_coords(size)
        a = rng.uniform(0, 2 * np.pi)
        t = (x * np.float32(np.cos(a)) + y * np.float32(np.sin(a)))
        t = t * np.float32(1 / size) + np.float32(0.5)
        return base + t[..., None] * (other - base)
    # clouds: a few random colour blobs, smoothly blended
    n = 4
    small = rng.uniform(0, 1, size=(n, n, 3)) * 255
    blobs = Image.fromarray(small.astype(np.uint8)).resize(
        (size, size), Image.BICUBIC)
    t = np.asarray(blobs, dtype=np.float32) * np.float32(1 / 255)
    return base + (t * 0.7) * (other - base)


def _photo_colours(rng, colours):
    """Pick foreground and background colours that stand apart."""
    if colours:
        fg = np.array(colours[rng.integers(len(colours))],
                      dtype=np.float32) / 255
        h, _, v = colorsys.rgb_to_hsv(*fg)
    else:
        h, v = rng.uniform(), rng.uniform(0.55, 1.0)
        fg = _hsv(h, rng.uniform(0.55, 1.0), v)
    bh = h + rng.uniform(0.25, 0.75)
    # background brightness far from the foreground's, so the outline shows
    bv = rng.uniform(0.15, 0.4) if v > 0.6 else rng.uniform(0.75, 1.0)
    base = _hsv(bh, rng.uniform(0.2, 0.8), bv)
    other = _hsv(bh + rng.uniform(-0.15, 0.15), rng.uniform(0.2, 0.8),
                 np.clip(bv + rng.uniform(-0.15, 0.15), 0, 1))
    return fg, base, other


def _compose(cover, domain, rng, controls, shadow):
    """Turn a coverage map into uint8 RGB pixels in the domain's style."""
    size = cover.shape[0]
    m = cover[..., None]
    if domain == "photo":
        fg, base, other = _photo_colours(rng, controls["colours"])
        kind = controls["backgrounds"][
            rng.integers(len(controls["backgrounds"]))]
        bg = _background(kind, size, rng, base, other)
        if shadow and rng.uniform() < 0.5:
            shift = max(1, size // 32)
            dark = np.zeros_like(cover)
            dark[shift:, shift:] = cover[:-shift, :-shift]
            bg = bg * (1 - 0.45 * dark[..., None])
        # light from one side: the shape is brighter on one edge
        x, y = _pixel_coords(size)
        a = rng.uniform(0, 2 * np.pi)
        light = (x * np.float32(np.cos(a)) + y * np.float32(np.sin(a)))
        light = 1 + light * np.float32(0.35 / size)
        img = bg + m * (fg * light[..., None] - bg)
        channels = 1  # grain in brightness only: a third of the cost
    elif domain == "sketch":
        paper = np.float32(rng.uniform(0.92, 1.0))
        ink = np.float32(rng.uniform(0.0, 0.2))
        img = paper + (ink - paper) * m
        channels = 1
    elif domain == "silhouette":
        paper = np.float32(rng.uniform(0.85, 1.0))
        ink = np.float32(rng.uniform(0.0, 0.25))
        img = paper + (ink - paper) * m
        channels = 1
    elif domain == "noisy_gray":
        g_bg = rng.uniform(0.2, 0.8)
        g_fg = g_bg + rng.choice([-1, 1]) * rng.uniform(0.3, 0.5)
        if not 0 <= g_fg <= 1:
            g_fg = g_bg - (g_fg - g_bg)
        img = np.float32(g_bg) + np.float32(g_fg - g_bg) * m
        channels = 1
    else:
        raise ValueError(f"unknown domain {domain!r}")
    noise = controls["noise"]
    if noise > 0:
        grain = rng.standard_normal((size, size, channels), dtype=np.float32)
        img = img + grain * np.float32(noise)
    img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def synthetic_images(kind: str = "shapes", classes: int | Sequence[str] = 5,
                     n_per_class: int = 20, image_size: int = 64,
                     domain: str = "photo", seed: int = 0,
                     transform: Callable | None = None,
                     **controls: Any) -> SyntheticImages:
    """Make a balanced dataset of drawn shapes or textures.

    Args:
        kind: "shapes" (SHAPES) or "textures" (TEXTURES).
        classes: how many classes (the first ones of SHAPES or TEXTURES),
            or a list of their names.
        n_per_class: images per class.
        image_size: side of the square images in pixels (16 to 1024).
        domain: how the classes are rendered, one of DOMAINS: "photo"
            (colourful, photo-like), "sketch" (black lines on white),
            "noisy_gray" (grayscale, heavy noise), "silhouette" (flat dark
            shapes on white).
        seed: the same seed gives the same images, on any machine; use
            different seeds for training and test sets.
        transform: applied to each PIL image, e.g. pretrained.transform.
        **controls: colours (photo foregrounds: names, hex codes or RGB
            tuples), backgrounds (photo: "solid", "gradient", "clouds"),
            noise (0-1 standard deviation), rotation (largest turn in
            degrees), scale (a number or a (min, max) range: shape size or
            texture period as a fraction of the image).

    Returns:
        a SyntheticImages dataset with .classes and .targets; images are
        drawn when read.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from: "
                         f"{', '.join(KINDS)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from: "
                         f"{', '.join(DOMAINS)}")
    names = _check_classes(kind, classes)
    check_int(n_per_class, "n_per_class", low=1)
    check_int(image_size, "image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE,
              why=f" pixels; below {MIN_IMAGE_SIZE} px the shapes cannot "
                  "be told apart")
    check_int(seed, "seed", low=0)
    checked = _check_controls(kind, domain, controls)
    return SyntheticImages(kind, names, n_per_class, image_size, domain,
                           seed, transform, checked)


# ------------------------------------------------------- real offline data


def digits(transform: Callable | None = None,
           image_size: int = 32) -> LabelledImages:
    """Load scikit-learn's 8x8 handwritten digits as RGB images.

    1,797 images of the digits 0-9, white ink on black, upscaled to
    `image_size`: a domain far from ImageNet's photos.
    """
    from sklearn.datasets import load_digits

    check_int(image_size, "image_size", 8, MAX_IMAGE_SIZE)
    bunch = load_digits()
    pixels = np.clip(bunch.images * (255 / 16), 0, 255).astype(np.uint8)
    size = (image_size, image_size)
    bilinear = Image.Resampling.BILINEAR
    images = [Image.fromarray(p).resize(size, bilinear).convert("RGB")
              for p in pixels]
    return LabelledImages(images, bunch.target.tolist(),
                          [str(d) for d in range(10)], transform)


# Photos bundled with scikit-image: what each shows, and the ImageNet-1k
# class ids a good model should rank first (any of them; None: ImageNet
# has no such class, so every answer is wrong - worth showing learners).
# Measured with efficientnet_lite0: chelsea -> Egyptian cat / tiger cat,
# coffee -> espresso, rocket -> missile, motorcycle -> moped, astronaut ->
# bobsled (12 %).
SAMPLE_PHOTOS = MappingProxyType({
    "chelsea": ("a tabby cat", (281, 282, 285)),  # tabby, tiger/Egyptian cat
    "coffee": ("a cup of coffee", (967, 968)),  # espresso, cup
    "rocket": ("a rocket on its pad", (657, 744, 812)),  # missile,
    #                                      projectile, space shuttle
    "motorcycle": ("a motorbike", (665, 670)),  # moped, motor scooter
    "astronaut": ("an astronaut", None),
})


def sample_photos() -> dict[str, Image.Image]:
    """Return scikit-image's bundled photos as RGB PIL images, by name.

    See SAMPLE_PHOTOS for what each shows and its expected ImageNet ids.
    """
    from skimage import data as skdata

    arrays = {"chelsea": skdata.chelsea(), "coffee": skdata.coffee(),
              "rocket": skdata.rocket(), "astronaut": skdata.astronaut(),
              "motorcycle": skdata.stereo_motorcycle()[0]}
    return {name: Image.fromarray(np.asarray(a)).convert("RGB")
            for name, a in arrays.items()}


# ------------------------------------------------------ a learner's folder


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, upright, with transparency made white."""
    with Image.open(path) as im:
        # phones store portrait photos sideways plus an EXIF rotation tag
        return _to_rgb(ImageOps.exif_transpose(im))


def _to_rgb(im):
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float grayscale: stretch to 8 bits instead of clipping
        a = np.asarray(im, dtype=np.float64)
        top = a.max() if a.size and a.max() > 0 else 1.0
        im = Image.fromarray((a / top * 255).astype(np.uint8))
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _readable(path):
    """Return None if the file decodes as an image, else the reason."""
    try:
        with Image.open(path) as im:
            # decoding at reduced size still reads the whole JPEG stream,
            # so truncated files fail here, only faster
            im.draft("RGB", (64, 64))
            im.load()
    except (OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as err:
        return str(err) or type(err).__name__
    return None


def _visible(entries):
    return sorted((e for e in entries if not e.name.startswith(".")),
                  key=lambda e: e.name)


def _class_files(folder):
    images, other = [], []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            path = os.path.join(root, n)
            if n.lower().endswith(IMAGE_EXTENSIONS):
                images.append(path)
            else:
                other.append(path)
    return images, other


def _scan_folder(path, check, progress):
    """Check a one-folder-per-class tree; return (root, classes, ok, bad)."""
    path = Path(path).expanduser()
    layout = (f"Put your images in one sub-folder per class, e.g. "
              f"{path / 'cats'}/1.jpg and {path / 'dogs'}/1.jpg.")
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {path}. Check "
                                f"the spelling and the current folder "
                                f"({Path.cwd()}). {layout}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder. {layout}")
    entries = _visible(os.scandir(path))
    class_dirs = [e for e in entries if e.is_dir()]
    if not class_dirs:
        loose = [e.name for e in entries
                 if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        what = (f"it holds {len(loose)} images but no class folders"
                if loose else "it is empty")
        raise ValueError(f"no class folders in {path}: {what}. {layout}")
    if len(class_dirs) == 1:
        raise ValueError(
            f"only one class folder ({class_dirs[0].name!r}) in {path}; a "
            "classifier needs at least two classes: add a second "
            f"sub-folder of images. {layout}")
    names = {e.name.lower() for e in class_dirs}
    if names <= _SPLIT_NAMES:
        split = sorted(e.name for e in class_dirs)
        raise ValueError(
            f"the sub-folders of {path} look like data splits ({split}), "
            "not classes; load each split on its own, e.g. "
            f"image_folder({str(path / split[0])!r})")
    classes, found, empty = [], {}, []
    for entry in class_dirs:
        images, other = _class_files(entry.path)
        if images:
            classes.append(entry.name)
            found[entry.name] = images
        else:
            kinds = sorted({Path(o).suffix.lower() or "(none)"
                            for o in other})
            extra = (f" (only files of types {', '.join(kinds)})"
                     if kinds else " (empty)")
            empty.append(f"{entry.name!r}{extra}")
    if empty:
        raise ValueError(
            f"class folders without images in {path}: {', '.join(empty)}. "
            "Add images with one of the extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}, or remove those folders.")
    good, bad = set(), []
    all_files = [f for c in classes for f in found[c]]
    if check:
        from tqdm.auto import tqdm

        bar = tqdm(all_files, desc="checking images", unit="file",
                   disable=not progress or len(all_files) < 200)
        for f in bar:
            reason = _readable(f)
            if reason is None:
                good.add(f)
            else:
                bad.append((f, reason))
    else:
        good.update(all_files)
    reasons = dict(bad)
    for c in classes:
        if not any(f in good for f in found[c]):
            first = found[c][0]
            raise ValueError(
                f"no readable images in class folder {c!r} of {path}: all "
                f"{len(found[c])} files failed to open (e.g. "
                f"{os.path.basename(first)}: {reasons.get(first)}); replace "
                "them with working JPEG or PNG files")
    return path, classes, good, bad


def _skip_warning(path, bad, shown=10):
    lines = [f"  {os.path.relpath(f, path)}: {why}" for f, why in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more")
    return (f"skipped {len(bad)} unreadable image file(s) in {path} "
            "(corrupt, truncated or not really images); delete or "
            "replace them to silence this warning:\n" + "\n".join(lines))


class CheckedImageFolder(ImageFolder):
    """An ImageFolder that ignores hidden folders; made by image_folder()."""

    def find_classes(self, directory):
        """Return the visible sub-folders as classes, sorted by name."""
        classes = [e.name for e in _visible(os.scandir(directory))
                   if e.is_dir()]
        return classes, {c: i for i, c in enumerate(classes)}


def image_folder(path: str | os.PathLike,
                 transform: Callable | None = None, check: bool = True,
                 progress: bool | None = None) -> CheckedImageFolder:
    """Load a folder with one sub-folder of images per class, with checks.

    Explains a missing path, an empty folder, a single class and class
    folders without images. Files that cannot be decoded are skipped with
    one warning that lists them (check=False skips that decoding pass).
    Grayscale, transparent and palette images come out as RGB; hidden
    files and folders (like .ipynb_checkpoints) are ignored.

    Returns:
        a CheckedImageFolder (a torchvision ImageFolder) with .classes,
        .targets and .samples.
    """
    progress = config.show_progress(progress)
    root, classes, good, bad = _scan_folder(path, check, progress)
    if bad:
        warnings.warn(_skip_warning(root, bad), UserWarning, stacklevel=2)
    return CheckedImageFolder(str(root), transform=transform,
                              loader=load_image,
                              is_valid_file=good.__contains__)


# ------------------------------------------------------------- downloads


class UnavailableError(RuntimeError):
    """Weights or data are not on this machine and cannot be fetched now."""


class ChecksumError(ValueError):
    """A file does not match its expected sha256: damaged or changed."""


class UnsafeArchiveError(ValueError):
    """An archive holds entries that would land outside its folder."""


# The name notebook 06 catches; the same class.
DataUnavailableError = UnavailableError


@dataclass(frozen=True)
class Download:
    """One downloadable dataset: where it lives and how to check it."""

    name: str
    url: str
    sha256: str
    archive: str  # "zip", "tar.gz" or "file"
    folder: str  # what the archive unpacks to (the folder we return)
    description: str
    size_mb: float


# Checksums as published in TensorFlow Datasets' url_checksums lists.
DOWNLOADS = MappingProxyType({
    "imagenette": Download(
        name="imagenette",
        url="https://s3.amazonaws.com/fast-ai-imageclas/"
            "imagenette2-160.tgz",
        sha256="88daccb09b6fce93f45e6c09ddeb269cce705549e6bff322092a2a5a"
               "11489863",
        archive="tar.gz", folder="imagenette2-160",
        description="10 easy ImageNet classes (fast.ai's Imagenette, "
                    "160 px), train/ and val/ folders: a near domain",
        size_mb=99.0),
    "flowers": Download(
        name="flowers",
        url="http://download.tensorflow.org/example_images/"
            "flower_photos.tgz",
        sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e"
               "3e595d9c",
        archive="tar.gz", folder="flower_photos",
        description="3,670 photos of 5 kinds of flowers (TensorFlow "
                    "flower_photos), one folder per class",
        size_mb=229.0),
})


def verify_sha256(path: str | os.PathLike, sha256: str,
                  remedy: str = "Delete it and download it again.") -> str:
    """Raise ChecksumError unless the file's sha256 starts with `sha256`.

    `sha256` is the full digest or, as in torch hub file names, a prefix.
    Returns the file's full sha256.
    """
    actual = files.sha256(path)
    if not actual.startswith(sha256.lower()):
        raise ChecksumError(
            f"checksum mismatch for {path}: expected sha256 "
            f"{sha256[:12]}..., got {actual[:12]}... The file is damaged, "
            f"truncated or was changed at its source. {remedy}")
    return actual


def _lookup(name, registry):
    if isinstance(name, Download):
        return name
    if name not in registry:
        raise ValueError(f"unknown dataset {name!r}; choose from: "
                         f"{', '.join(registry) or '(none)'}")
    return registry[name]


# What a failed connection raises (a full disk is not among them).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException,
                   ConnectionError, TimeoutError)


def fetch(url: str, path: Path, sha256: str, explain: Callable[[str], str],
          progress: bool | None = None) -> Path:
    """Download `url` to `path`, checked by its sha256 (or a prefix).

    A failed or refused download leaves nothing behind. Offline
    (TLH_OFFLINE) or when the network fails, raise UnavailableError with
    the message explain(why) returns.
    """
    progress = config.show_progress(progress)
    if config.offline_mode():
        raise UnavailableError(explain("TLH_OFFLINE is set"))
    try:
        with files.atomic_path(path) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=progress)
            verify_sha256(tmp, sha256)
    except _NETWORK_ERRORS as err:
        raise UnavailableError(
            explain(f"the download failed ({err})")) from err
    return path


def _explain_download(entry, archive):
    def explain(why):
        return (f"cannot download {entry.name!r}: {why}. Either connect "
                f"to the network (and unset TLH_OFFLINE), or fetch "
                f"{entry.url} on another machine and copy it to {archive}; "
                "it is checked against its sha256 and unpacked there. "
                "Offline, synthetic_images() and digits() need no download.")
    return explain


def _extract(entry, archive, target):
    """Unpack an archive into `target`, refusing paths that leave it."""
    if entry.archive == "zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                dest = (target / member).resolve()
                if not dest.is_relative_to(target.resolve()):
                    raise UnsafeArchiveError(
                        f"{archive} holds an unsafe path {member!r} that "
                        "would be written outside its folder; it was not "
                        "unpacked. Delete it and report the source.")
            zf.extractall(target)
    elif entry.archive == "tar.gz":
        with tarfile.open(archive, "r:*") as tf:
            try:
                tf.extractall(target, filter="data")
            except tarfile.FilterError as err:
                raise UnsafeArchiveError(
                    f"{archive} holds an unsafe entry ({err}); it was not "
                    "unpacked. Delete it and report the source.") from err
    elif entry.archive == "file":
        shutil.copy2(archive, target / entry.folder)
    else:
        raise ValueError(f"unknown archive type {entry.archive!r} for "
                         f"{entry.name!r}; use 'zip', 'tar.gz' or 'file'")


def download(name: str | Download, root: str | os.PathLike | None = None,
             registry: Mapping[str, Download] | None = None,
             progress: bool | None = None) -> Path:
    """Download, verify and unpack a dataset once; return its folder.

    Args:
        name: a key of DOWNLOADS (or of `registry`), or a Download entry.
        root: where datasets are kept; default config.cache_dir("data").
        registry: a mapping of name -> Download to use instead of DOWNLOADS.

    Returns:
        Path of the unpacked folder, e.g. .../imagenette/imagenette2-160.
    """
    progress = config.show_progress(progress)
    entry = _lookup(name, DOWNLOADS if registry is None else registry)
    base = Path(root).expanduser() if root else config.cache_dir("data")
    home = base / entry.name
    home.mkdir(parents=True, exist_ok=True)
    final = home / entry.folder
    marker = home / ".complete"
    if (final.exists() and marker.exists()
            and marker.read_text().strip() == entry.sha256):
        return final
    filename = os.path.basename(entry.url.rstrip("/")) or entry.name
    archive = home / filename
    if not archive.exists():
        fetch(entry.url, archive, entry.sha256,
              _explain_download(entry, archive), progress)
    else:
        verify_sha256(archive, entry.sha256)
    work = Path(tempfile.mkdtemp(dir=home, prefix=".unpack-"))
    try:
        _extract(entry, archive, work)
        if not (work / entry.folder).exists():
            raise ValueError(
                f"{archive} did not unpack to a folder {entry.folder!r}; "
                "the registry entry is wrong")
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / entry.folder, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files.write_text(marker, entry.sha256 + "\n")
    archive.unlink()
    return final




# -------------------------------------------------------- synthetic text

# Topic sentences made for measuring transfer. Each topic has two sets of
# key words, and the sentences use two sets of templates: the train split
# draws from the first of each, the test split from the second. The
# templates are the same for every topic, so only the key words tell the
# topics apart, and no key word or phrasing of the test split ever appears
# in training. A model that knows only the words it was trained on (TF-IDF)
# is left at chance on the test split; a pretrained encoder that knows that
# "hockey" and "tennis" are both sports is not.
TEXT_TOPICS = MappingProxyType({
    "sports": (
        ("football", "tennis", "goalkeeper", "stadium", "referee",
         "marathon", "cyclist", "trophy", "championship", "swimmer"),
        ("basketball", "hockey", "coach", "tournament", "athlete",
         "sprinter", "volleyball", "golfer", "scoreboard", "league")),
    "food": (
        ("pizza", "soup", "bakery", "chef", "salad", "noodles", "omelette",
         "cheese", "breakfast", "recipe"),
        ("sandwich", "pasta", "kitchen", "dessert", "bread", "curry",
         "pancakes", "butter", "dinner", "cookbook")),
    "weather": (
        ("rain", "storm", "snow", "thunder", "forecast", "wind", "clouds",
         "hurricane", "frost", "temperature"),
        ("fog", "hail", "drizzle", "blizzard", "sunshine", "lightning",
         "tornado", "humidity", "rainfall", "meteorologist")),
    "technology": (
        ("laptop", "software", "keyboard", "internet", "processor", "email",
         "password", "server", "browser", "programmer"),
        ("smartphone", "computer", "website", "app", "printer", "database",
         "router", "algorithm", "tablet", "spreadsheet")),
    "music": (
        ("guitar", "piano", "concert", "singer", "drummer", "melody",
         "choir", "symphony", "lyrics", "microphone"),
        ("violin", "orchestra", "band", "song", "trumpet", "album", "cello",
         "saxophone", "rhythm", "composer")),
    "animals": (
        ("dog", "horse", "elephant", "rabbit", "tiger", "parrot", "giraffe",
         "squirrel", "owl", "zebra"),
        ("cat", "lion", "dolphin", "wolf", "monkey", "eagle", "kangaroo",
         "penguin", "fox", "bear")),
})
TEXT_TEMPLATES = MappingProxyType({
    "train": (
        "I read an article about the {a} and the {b}.",
        "Yesterday we discussed the {a} and the {b} for hours.",
        "The {a} was in the news again, right after the {b}.",
        "She wrote a long letter about the {a} and the {b}.",
        "Everyone at work was talking about the {a} and the {b}.",
        "There is a new podcast about the {a} and the {b}.",
        "He asked me what I think of the {a} and the {b}.",
        "Our teacher showed us pictures of the {a} and the {b}.",
        "The report covers the {a}, and later the {b}.",
        "I can't stop thinking about the {a} and the {b}.",
        "We watched a documentary about the {a} and the {b}.",
        "My friend keeps telling stories about the {a} and the {b}."),
    "test": (
        "Did you hear anything new about the {a} or the {b}?",
        "Honestly, the {a} and the {b} are all my cousin cares about.",
        "Last night the radio show was all about the {a} and the {b}.",
        "Can someone explain the {a} to me, and the {b} too?",
        "Grandma sent a postcard mentioning the {a} and the {b}.",
        "The magazine had a whole page on the {a} plus the {b}.",
        "Nobody expected so many questions about the {a} and the {b}.",
        "My sister made a video about the {a} and the {b}.",
        "The {a} came up at dinner, and then the {b}.",
        "In class today we debated the {a} and the {b}."),
})
TEXT_SPLITS = ("train", "test")
TEXT_CLASSES = tuple(TEXT_TOPICS)


class SyntheticText(Dataset):
    """Labelled topic sentences; items are (sentence or tokens, label).

    Without a transform an item is the sentence itself (a str); give the
    dataset the model's tokenizer (``with_transform(ds, model.transform)``)
    to get token tensors a text model takes.
    """

    def __init__(self, sentences, targets, classes, split, seed,
                 transform=None):
        self.sentences = list(sentences)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.split = split
        self.seed = seed
        self.transform = transform

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, index):
        sentence = self.sentences[index]
        if self.transform is not None:
            sentence = self.transform(sentence)
        return sentence, self.targets[index]

    @property
    def key_words(self) -> dict[str, list[str]]:
        """Return {class: the key words this split's sentences use}."""
        column = TEXT_SPLITS.index(self.split)
        return {c: list(TEXT_TOPICS[c][column]) for c in self.classes}

    @property
    def templates(self) -> list[str]:
        """Return the sentence templates this split uses."""
        return list(TEXT_TEMPLATES[self.split])

    def fingerprint(self) -> str:
        """Return what the items depend on (for the feature cache)."""
        digest = hashlib.blake2b(digest_size=16)
        for sentence, target in zip(self.sentences, self.targets):
            digest.update(f"{target}\t{sentence}\n".encode())
        return f"{self.split}-{self.seed}-{digest.hexdigest()}"

    def __repr__(self):
        return (f"SyntheticText({len(self)} {self.split} sentences, "
                f"classes={self.classes}, seed={self.seed})")


def _check_text_classes(classes):
    if isinstance(classes, int) and not isinstance(classes, bool):
        if not 2 <= classes <= len(TEXT_CLASSES):
            raise ValueError(f"classes must be between 2 and "
                             f"{len(TEXT_CLASSES)}, got {classes}")
        return list(TEXT_CLASSES[:classes])
    names = list(classes)
    unknown = [c for c in names if c not in TEXT_TOPICS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TEXT_CLASSES, 1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown topic {unknown[0]!r}.{hint} The topics "
                         f"are {', '.join(TEXT_CLASSES)}.")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"classes needs at least 2 different topics, got "
                         f"{names}")
    return names


def synthetic_text(split: str = "train", classes: int | Sequence[str] = 4,
                   n_per_class: int = 20, seed: int = 0,
                   transform: Callable | None = None) -> SyntheticText:
    """Draw labelled topic sentences; test words never appear in training.

    Args:
        split: "train" or "test". The two splits use disjoint key words
            and disjoint sentence templates (see TEXT_TOPICS and
            TEXT_TEMPLATES).
        classes: how many topics (the first ones of TEXT_CLASSES), or a
            list of topic names.
        n_per_class: sentences per topic, all different (at most 1,080
            for train, 900 for test).
        seed: the same seed gives the same sentences in any process.
        transform: applied to each sentence when read (a tokenizer).
    """
    if split not in TEXT_SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = _check_text_classes(classes)
    column = TEXT_SPLITS.index(split)
    templates = TEXT_TEMPLATES[split]
    words = len(TEXT_TOPICS[names[0]][column])
    most = len(templates) * words * (words - 1)
    check_int(n_per_class, "n_per_class", 1, most,
              why=f" for the {split} split")
    check_int(seed, "seed", error=TypeError)
    sentences, targets = [], []
    for label, name in enumerate(names):
        keys = TEXT_TOPICS[name][column]
        rng = np.random.default_rng(_stable_int("text", split, name, seed))
        # Every (template, first word, second word) once: no duplicates.
        picks = rng.choice(most, size=n_per_class, replace=False)
        for pick in picks.tolist():
            t, rest = divmod(pick, words * (words - 1))
            i, j = divmod(rest, words - 1)
            j += j >= i
            sentences.append(templates[t].format(a=keys[i], b=keys[j]))
            targets.append(label)
    order = np.random.default_rng(_stable_int("order", split, seed)
                                  ).permutation(len(sentences))
    return SyntheticText([sentences[i] for i in order],
                         [targets[i] for i in order], names, split, seed,
                         transform)
