"""Feature extraction through a frozen backbone, its disk cache, probes.

A frozen backbone gives the same features for the same image every epoch,
so ``extract_features`` runs it once and keeps the result on disk. The
cache key covers everything the features depend on: the network (name,
weights and a hash of every weight), the preprocessing (the transform's
repr) and the data (a fingerprint of the dataset). Change any of them and
the features are computed again.
"""

import copy
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tlhelpers import config, files, models, training

CACHE_FORMAT = "tlhelpers-features-1"


@dataclass
class Features:
    """Feature vectors [N, D] (float32) and their labels [N] (int64)."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list | None = None
    from_cache: bool = False

    def __len__(self):
        return len(self.labels)

    def __repr__(self):
        n, d = self.features.shape
        return (f"Features({n} x {d}, {len(set(self.labels.tolist()))} "
                f"classes, from_cache={self.from_cache})")


# ------------------------------------------------------------ hashing


def _update(digest, value):
    """Feed a value (tensor, array, image, container, scalar) to a hash."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # PIL image
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(repr(value).encode())


def state_hash(module: nn.Module) -> str:
    """Return a hex digest of a module's structure and every weight."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(module).encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        _update(digest, value)
    return digest.hexdigest()


def _fingerprint(dataset, digest, progress):
    """Hash what a dataset's items depend on, as cheaply as is safe.

    A dataset that knows what its items depend on says so with
    fingerprint(): a value, or a list of values, in which a dataset it
    wraps stands for that dataset's own fingerprint. torch's and
    torchvision's datasets are hashed from what defines them; any other
    dataset item by item.
    """
    from torch.utils.data import Dataset, Subset, TensorDataset

    digest.update(f"{type(dataset).__qualname__}{len(dataset)}".encode())
    # A transform without parameters in its repr (a lambda) shows its
    # address, so it never matches a cache file: safe, only slower.
    digest.update(repr(getattr(dataset, "transform", None)).encode())
    if callable(getattr(dataset, "fingerprint", None)):
        parts = dataset.fingerprint()
        for part in parts if isinstance(parts, list) else [parts]:
            if isinstance(part, Dataset):
                _fingerprint(part, digest, progress)
            else:
                _update(digest, part)
    elif isinstance(dataset, TensorDataset):
        _update(digest, list(dataset.tensors))
    elif isinstance(dataset, Subset):
        _update(digest, list(dataset.indices))
        _fingerprint(dataset.dataset, digest, progress)
    elif hasattr(dataset, "samples"):  # ImageFolder: files and their stats
        for path, target in dataset.samples:
            stat = os.stat(path)
            _update(digest, (path, target, stat.st_size, stat.st_mtime_ns))
    elif isinstance(getattr(dataset, "dataset", None), Dataset):
        _fingerprint(dataset.dataset, digest, progress)
    else:
        # Unknown dataset: hash every item, the only safe choice.
        for i in tqdm(range(len(dataset)), desc="fingerprinting data",
                      leave=False, disable=not progress):
            _update(digest, dataset[i])


def data_fingerprint(dataset: torch.utils.data.Dataset,
                     progress: bool = False) -> str:
    """Return a hex digest that changes when the data or transform change.

    Datasets with a fingerprint() method (the course's own: synthetic
    images from their parameters and a few drawn items, subsets from
    their indices, in-memory images from their bytes) and torch's are
    hashed from what defines them (image folders from file names, sizes
    and times; tensors from their bytes); any other dataset item by item.
    """
    digest = hashlib.blake2b(digest_size=16)
    _fingerprint(dataset, digest, progress)
    return digest.hexdigest()


# ---------------------------------------------------------- extraction


def _backbone(model):
    """Return (feature network, short name, identity parts for the key)."""
    if isinstance(model, models.Pretrained):
        net = models.feature_extractor(model)
        return net, model.name, [model.name, str(model.weights)]
    if isinstance(model, nn.Module):
        return model, type(model).__name__, [type(model).__qualname__]
    raise TypeError("extract_features needs the Pretrained from "
                    "load_pretrained or an nn.Module that maps a batch to "
                    f"features, got {type(model).__name__}")


def _forward_all(net, dataset, batch_size, device, progress):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    feats, labels = [], []
    with torch.inference_mode():
        bar = tqdm(loader, desc="extracting features", unit="batch",
                   disable=not progress)
        for batch in bar:
            x, y = batch
            out = net(x.to(device, non_blocking=True))
            if out.ndim != 2:
                raise ValueError(
                    f"the model returned outputs of shape {tuple(out.shape)}"
                    "; extract_features needs one feature vector per image "
                    "[N, D]. Pass the Pretrained itself, or "
                    "feature_extractor(model).")
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(y))
    if not feats:
        raise ValueError("the dataset is empty: no features to extract")
    return torch.cat(feats), torch.cat(labels).long()


def _check_items(dataset):
    image = dataset[0][0]
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"the dataset yields {type(image).__name__} items, but the "
            "backbone needs tensors: give the dataset the model's "
            "preprocessing, e.g. with_transform(dataset, "
            "pretrained.transform)")


def extract_features(model: models.Model, dataset: Any,
                     batch_size: int = 64, cache: bool = True,
                     cache_dir: str | os.PathLike | None = None,
                     device: str | torch.device | None = None,
                     progress: bool | None = None) -> Features:
    """Run the frozen backbone over a dataset once; cache the features.

    Args:
        model: the Pretrained from load_pretrained (its head is removed,
            see models.feature_extractor), or an nn.Module that maps a
            batch to [N, D] features (used as it is, in eval mode).
        dataset: yields (preprocessed image tensor, label).
        cache: reuse features saved by an earlier call with the same
            network, weights, transform and data; save new ones.
        cache_dir: where to keep them (default: the course cache folder,
            "features" inside it).

    Returns:
        Features(features [N, D] float32, labels [N] int64) on the CPU.
    """
    progress = config.show_progress(progress)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: no features to extract")
    _check_items(dataset)
    net, name, identity = _backbone(model)
    device = config.get_device(device)
    classes = getattr(dataset, "classes", None)
    path = None
    if cache:
        digest = hashlib.blake2b(digest_size=16)
        _update(digest, identity + [state_hash(net),
                                    data_fingerprint(dataset, progress)])
        key = digest.hexdigest()
        folder = (config.cache_dir("features") if cache_dir is None
                  else Path(cache_dir))
        path = folder / f"{name}-{key[:24]}.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu",
                                   weights_only=True)
                if saved.get("format") == CACHE_FORMAT and saved["key"] == key:
                    return Features(saved["features"], saved["labels"],
                                    classes, from_cache=True)
            except Exception as err:  # a damaged file is only a cache miss
                warnings.warn(f"ignoring the unreadable feature cache "
                              f"{path.name} ({err}); computing again",
                              stacklevel=2)
    with models.eval_mode(net.to(device)):
        feats, labels = _forward_all(net, dataset, batch_size, device,
                                     progress)
    if path is not None:
        files.save({"format": CACHE_FORMAT, "key": key,
                    "features": feats, "labels": labels}, path)
    return Features(feats, labels, classes)


# ------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    """A linear classifier trained on features, and how well it does.

    classifier is a scikit-learn pipeline ("logistic") or an nn.Linear
    that maps raw features to class scores ("torch"), ready to be used as
    the network's new head.
    """

    accuracy: float
    classifier: object
    train_accuracy: float
    method: str

    def __repr__(self):
        return (f"ProbeResult(method={self.method!r}, accuracy="
                f"{self.accuracy:.3f}, train_accuracy="
                f"{self.train_accuracy:.3f})")


SCALINGS = (True, False, "global")
# A per-feature scale is floored at this fraction of the features' typical
# scale: on a few dozen samples a near-constant feature would otherwise be
# blown up into noise (standardize=True used to floor at 1e-6).
RELATIVE_FLOOR = 0.1


def feature_scaling(x: torch.Tensor, standardize: bool | str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mean, scale) [D] that standardise features x [N, D].

    standardize: True scales each feature by its own std (floored at
    RELATIVE_FLOOR of the typical std); "global" centres each feature and
    divides all by one number, the typical std, so the features keep
    their relative sizes; False leaves them as they are.
    """
    if standardize not in SCALINGS:
        raise ValueError(f"standardize must be True, False or 'global', "
                         f"got {standardize!r}")
    d = x.shape[1]
    if standardize is False:
        return torch.zeros(d), torch.ones(d)
    mean = x.mean(0)
    std = x.std(0) if len(x) > 1 else torch.ones(d)
    # The features' typical scale: the root mean square of their stds
    # (a plain mean would follow the many near-constant dimensions).
    typical = float(std.pow(2).mean().sqrt()) or 1.0
    if standardize == "global":
        return mean, torch.full((d,), typical)
    return mean, std.clamp_min(RELATIVE_FLOOR * typical)


def _fold(weight, bias, mean, scale):
    """Return (weight, bias) that act on raw features, scaling included."""
    weight = weight / scale
    return weight, bias - weight @ mean


def _torch_probe(train, test, epochs, lr, batch_size, weight_decay,
                 standardize, seed, device):
    x, y = train.features, train.labels
    num_classes = int(max(y.max(), test.labels.max())) + 1
    mean, scale = feature_scaling(x, standardize)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], num_classes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset((x - mean) / scale, y),
        batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr,
                                  weight_decay=weight_decay)
    training.fit(head, loader, None, optimizer, epochs, device=device,
                 progress=False, keep_best=False)
    # Fold the standardisation into the layer so it takes raw features.
    classifier = copy.deepcopy(head).cpu()
    with torch.no_grad():
        weight, bias = _fold(head.weight.cpu(), head.bias.cpu(), mean, scale)
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)

    def accuracy(f):
        with torch.no_grad():
            return (classifier(f.features).argmax(1) == f.labels
                    ).float().mean().item()

    return classifier, accuracy(train), accuracy(test)


def _logistic_probe(train, test, C, max_iter, standardize):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y = train.features, train.labels.numpy()
    mean, scale = feature_scaling(x, standardize)
    classifier = LogisticRegression(C=C, max_iter=max_iter)
    # One BLAS thread: on problems this small, more threads only contend
    # (measured 50x slower on a busy 2-core machine).
    with threadpool_limits(1):
        classifier.fit(((x - mean) / scale).numpy(), y)
    # Fold the scaling in: the classifier takes raw features.
    weight, bias = _fold(torch.from_numpy(classifier.coef_).float(),
                         torch.from_numpy(classifier.intercept_).float(),
                         mean, scale)
    classifier.coef_ = weight.double().numpy()
    classifier.intercept_ = bias.double().numpy()
    with threadpool_limits(1):
        accuracy = classifier.score(test.features.numpy(),
                                    test.labels.numpy())
        train_accuracy = classifier.score(x.numpy(), y)
    return classifier, float(train_accuracy), float(accuracy)


def linear_probe(train: Features, test: Features, method: str = "logistic",
                 C: float = 1.0, max_iter: int = 1000, epochs: int = 30,
                 lr: float = 1e-2, batch_size: int = 64,
                 weight_decay: float = 0.0, standardize: bool | str = "global",
                 seed: int = 0, device: str | torch.device | None = None
                 ) -> ProbeResult:
    """Train a linear classifier on features; report its accuracy.

    Args:
        train, test: Features from extract_features.
        method: "logistic" (scikit-learn's LogisticRegression with
            inverse regularisation C) or "torch" (an nn.Linear trained
            with AdamW by fit for `epochs` epochs of minibatches).
        standardize: how features are scaled before training (see
            feature_scaling): "global" (the default) centres them and
            divides all by one typical scale, keeping their relative
            sizes; True scales each to std 1; False leaves them raw. The
            returned classifier takes raw features either way. Chosen by
            benchmarks/bench_probes.py: per-feature scaling blows up the
            many near-constant dimensions of a few-shot sample.
    """
    for name, f in (("train", train), ("test", test)):
        if not isinstance(f, Features):
            raise TypeError(f"{name} must be the Features that "
                            f"extract_features returns, got "
                            f"{type(f).__name__}")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"train and test features differ in size "
                         f"({train.features.shape[1]} vs "
                         f"{test.features.shape[1]}): extract both with "
                         "the same backbone")
    if method == "logistic":
        classifier, train_acc, test_acc = _logistic_probe(
            train, test, C, max_iter, standardize)
    elif method == "torch":
        classifier, train_acc, test_acc = _torch_probe(
            train, test, epochs, lr, batch_size, weight_decay, standardize,
            seed, device)
    else:
        raise ValueError(f"unknown method {method!r}: use 'logistic' or "
                         "'torch'")
    return ProbeResult(accuracy=test_acc, classifier=classifier,
                       train_accuracy=train_acc, method=method)
