"""Tests for tlhelpers.models: offline weights, groups, freezing, rates."""

import copy
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tlhelpers import models as M
from tlhelpers.data import ChecksumError, UnavailableError

# ImageNet ids of the right answers for scikit-image's bundled photos.
CAT_IDS = set(range(281, 286))          # tabby ... Egyptian cat
COFFEE_IDS = {967, 968, 504}            # espresso, cup, coffee mug
ROCKET_IDS = {657, 744, 812}            # missile, projectile, space shuttle


@pytest.fixture(scope="module")
def lite0():
    return M.load_pretrained("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_three_classes():
    """Lite0 with ImageNet weights and a new 3-class head, loaded once:
    tests deepcopy it instead of reading and hashing the file again."""
    return M.load_pretrained("efficientnet_lite0", num_classes=3)


def _photo(name):
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def _top5(pretrained, image):
    x = pretrained.transform(image).unsqueeze(0)
    with torch.no_grad():
        probs = pretrained.model.eval()(x).softmax(-1)[0]
    top = probs.topk(5)
    return top.indices.tolist(), top.values.tolist()


# ---------------------------------------------------------- offline weights


def test_lite0_loads_offline_with_every_key_mapped(no_network):
    pm = M.load_pretrained("efficientnet_lite0")
    assert pm.meta["sha256"] == M.LITE0_SHA256
    assert pm.meta["num_params"] == 4_652_008
    assert len(pm.categories) == 1000 and pm.categories[281] == "tabby"
    assert pm.groups[0] == "stem" and pm.groups[-1] == "head"
    source = M._load_state(M.lite0_weights_path())
    target = pm.model.state_dict()
    mapped = M.map_lite0_state_dict(source, target)
    missing, unexpected = pm.model.load_state_dict(mapped, strict=False)
    assert missing == [] and unexpected == []


@pytest.mark.parametrize("photo, right_ids, top1_id", [
    ("chelsea", CAT_IDS, None),
    ("coffee", COFFEE_IDS, 967),
    ("rocket", ROCKET_IDS, 657),
])
def test_lite0_recognises_the_bundled_photos(lite0, photo, right_ids,
                                              top1_id, no_network):
    ids, probs = _top5(lite0, _photo(photo))
    assert right_ids & set(ids), f"{photo}: top-5 {ids}"
    assert ids[0] in right_ids
    if top1_id is not None:
        assert ids[0] == top1_id
    # Recorded top-1 probabilities with timm's preprocessing for these
    # weights (bicubic, crop 0.875): chelsea 0.39 (tiger cat, Egyptian cat
    # 0.36 close behind), coffee 0.95, rocket 0.27 (projectile 0.19 next).
    assert probs[0] > 0.25


def _stem_bn_error(model, batch):
    """Mean |batch mean - running mean| / running std at the stem's BN."""
    stats = {}
    bn = model.bn1

    def hook(module, inputs, output):
        x = inputs[0]
        stats["err"] = ((x.mean((0, 2, 3)) - module.running_mean).abs()
                        / (module.running_var + 1e-3).sqrt()).mean().item()

    handle = bn.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(batch)
    handle.remove()
    return stats["err"]


def test_lite0_normalisation_is_the_one_its_statistics_expect(lite0):
    """The stem's BatchNorm sees photos as in training only with mean=std=.5.

    This is the evidence for LITE0_MEAN/LITE0_STD: with ImageNet's usual
    mean/std the first layer's activations drift from the running means
    the weights were trained with.
    """
    from torchvision import transforms as T

    photos = [_photo(n) for n in ("chelsea", "coffee", "rocket",
                                  "astronaut")]
    errors = {}
    for label, (mean, std) in {"half": (M.LITE0_MEAN, M.LITE0_STD),
                               "imagenet": (M.IMAGENET_MEAN,
                                            M.IMAGENET_STD)}.items():
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(mean, std)])
        batch = torch.stack([tf(p) for p in photos])
        errors[label] = _stem_bn_error(lite0.model, batch)
    assert errors["half"] < 0.8 * errors["imagenet"], errors


def test_corrupted_weights_file_is_refused(tmp_path, monkeypatch):
    broken = tmp_path / "efficientnet-lite0.pth"
    data = M.lite0_weights_path().read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(M, "lite0_weights_path", lambda: broken)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        M.load_pretrained("efficientnet_lite0")


def _fake_torchvision_cache(tmp_path, monkeypatch, name="resnet18"):
    """Fill a temporary hub cache with weights, as a download would."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    from torchvision import models as tvm

    state = tvm.get_model(name, weights=None).state_dict()
    staging = tmp_path / "staging.pth"
    torch.save(state, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    url = f"https://example.invalid/{name}-{prefix}.pth"
    monkeypatch.setattr(M, "_torchvision_url", lambda n: url)
    target = M.torchvision_cache_path(name)
    target.parent.mkdir(parents=True)
    shutil.copy(staging, target)
    return state


def test_torchvision_model_loads_from_a_filled_cache_offline(
        tmp_path, monkeypatch, no_network):
    state = _fake_torchvision_cache(tmp_path, monkeypatch)
    assert M.weights_available_offline("resnet18")
    pm = M.load_pretrained("resnet18", num_classes=3)
    loaded = pm.model.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"],
                       state["layer1.0.conv1.weight"])
    assert pm.model.fc.out_features == 3
    assert pm.meta["mean"] == M.IMAGENET_MEAN


def test_torchvision_model_with_empty_cache_explains_offline_choice(
        tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty"))
    assert not M.weights_available_offline("resnet18")
    with pytest.raises(UnavailableError) as err:
        M.load_pretrained("resnet18")
    text = str(err.value)
    assert "'resnet18'" in text and "download" in text
    assert "efficientnet_lite0" in text
    assert not list((tmp_path / "empty").rglob("*.part"))


def test_offline_mode_never_tries_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty"))
    monkeypatch.setenv("TLH_OFFLINE", "1")

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(UnavailableError, match="TLH_OFFLINE"):
        M.load_pretrained("mobilenet_v3_small")


def test_corrupted_torchvision_cache_file_is_refused(tmp_path, monkeypatch):
    _fake_torchvision_cache(tmp_path, monkeypatch)
    path = M.torchvision_cache_path("resnet18")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ChecksumError, match="resnet18"):
        M.load_pretrained("resnet18")


def test_list_models_reports_offline_availability(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty"))
    table = M.list_models()
    offline = dict(zip(table.column("name"),
                       table.column("offline_available")))
    assert set(offline) == set(M.MODEL_NAMES)
    assert offline["efficientnet_lite0"] is True
    assert offline["resnet18"] is False
    assert "efficientnet_lite0" in str(table)
    assert "<table>" in table._repr_html_()


# ---------------------------------------------------------------- bad input


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        M.load_pretrained("resnet19")
    assert "resnet18" in str(err.value) and "vgg16" in str(err.value)
    assert "Did you mean 'resnet18'" in str(err.value)


@pytest.mark.parametrize("bad, exc", [(1, ValueError), (0, ValueError),
                                      (2.0, TypeError), ("5", TypeError),
                                      (True, TypeError)])
def test_num_classes_must_be_an_int_of_at_least_two(bad, exc):
    with pytest.raises(exc, match="num_classes"):
        M.load_pretrained("efficientnet_lite0", num_classes=bad,
                          weights=None)


def test_unknown_weights_value_says_what_is_valid():
    with pytest.raises(ValueError, match="weights='imagenet'"):
        M.load_pretrained("efficientnet_lite0", weights="imagenet21k")


def test_random_init_has_same_architecture_but_different_weights(lite0):
    scratch = M.load_pretrained("efficientnet_lite0", weights=None)
    assert scratch.groups == lite0.groups
    assert scratch.meta["sha256"] is None
    a = lite0.model.conv_stem.weight
    b = scratch.model.conv_stem.weight
    assert a.shape == b.shape and not torch.equal(a, b)


# ------------------------------------------------------------- layer groups


@pytest.mark.parametrize("name", M.MODEL_NAMES)
def test_groups_cover_every_parameter_exactly_once(name):
    pm = M.load_pretrained(name, weights=None, num_classes=4, image_size=64)
    seen = []
    for mods in M.layer_groups(pm).values():
        seen += [id(p) for p in M.group_parameters(mods)]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in pm.model.parameters()}
    assert pm.groups[-1] == "head"
    assert M.get_head(pm).out_features == 4


def test_unknown_architecture_falls_back_to_children_with_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    with pytest.warns(UserWarning, match="no known layer grouping"):
        groups = M.layer_groups(model)
    assert list(groups) == ["0", "3"]


def test_new_head_is_the_only_change(lite0):
    pm = M.load_pretrained("efficientnet_lite0", num_classes=7)
    assert pm.model.classifier.out_features == 7
    a, b = lite0.model.state_dict(), pm.model.state_dict()
    for key in a:
        if not key.startswith("classifier"):
            assert torch.equal(a[key], b[key]), key


def test_feature_extractor_leaves_the_model_untouched(lite0):
    fx = M.feature_extractor(lite0)
    out = fx(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, M.feature_dim(lite0)) == (2, 1280)
    assert isinstance(lite0.model.classifier, nn.Linear)
    assert not any(p.requires_grad for p in fx.parameters())


# ---------------------------------------------------------------- freezing


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _frozen_keys(pm):
    """State-dict keys (params and buffers) of frozen groups."""
    status = M.group_status(pm)
    frozen_ids = set()
    for name, mods in M.layer_groups(pm).items():
        if not status[name]:
            for mod in mods:
                frozen_ids |= {id(t) for t in mod.state_dict(
                    keep_vars=True).values()}
    return [k for k, v in pm.model.state_dict(keep_vars=True).items()
            if id(v) in frozen_ids]


def _train_steps(pm, optimizer, steps=3, size=64, set_to_none=True):
    gen = torch.Generator().manual_seed(0)
    pm.model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, size, size, generator=gen) * 2 + 0.5
        y = torch.randint(0, pm.num_classes, (8,), generator=gen)
        loss = nn.functional.cross_entropy(pm.model(x), y)
        optimizer.zero_grad(set_to_none=set_to_none)
        loss.backward()
        optimizer.step()


def _optimizers():
    return {
        "sgd_momentum_wd": lambda params: torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=0.1),
        "adamw": lambda params: torch.optim.AdamW(params, lr=0.01,
                                                  weight_decay=0.1),
    }


@pytest.mark.parametrize("opt_name", list(_optimizers()))
@pytest.mark.parametrize("how", ["optimizer_after_freeze",
                                 "optimizer_before_freeze"])
def test_frozen_groups_stay_bit_identical_after_real_steps(
        opt_name, how, lite0_three_classes):
    """Frozen weights and BatchNorm buffers do not move, the head does.

    "optimizer_before_freeze" is the classic trap: the optimizer holds
    every parameter, some of them with stale gradients and momentum from
    an earlier step, and zero_grad(set_to_none=False) leaves zero-filled
    gradients that momentum and weight decay would still act on.
    """
    torch.manual_seed(0)
    pm = copy.deepcopy(lite0_three_classes)
    make = _optimizers()[opt_name]
    if how == "optimizer_before_freeze":
        optimizer = make(pm.model.parameters())
        _train_steps(pm, optimizer, steps=1, set_to_none=False)
        M.freeze_to(pm, -3, bn_stats="frozen_groups")
    else:
        M.freeze_to(pm, -3, bn_stats="frozen_groups")
        optimizer = make([p for p in pm.model.parameters()
                          if p.requires_grad])
    before = _snapshot(pm.model)
    frozen = _frozen_keys(pm)
    assert any("running_mean" in k for k in frozen)
    _train_steps(pm, optimizer, set_to_none=how == "optimizer_after_freeze")
    after = pm.model.state_dict()
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"{key} moved"
    assert not torch.equal(before["classifier.weight"],
                           after["classifier.weight"])
    # The trainable stage7 BatchNorm does update its statistics.
    assert not torch.equal(before["blocks.6.0.bn1.running_mean"],
                           after["blocks.6.0.bn1.running_mean"])


def test_model_train_does_not_wake_frozen_batchnorm():
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    M.freeze(pm)
    pm.model.train()
    stem_bn = pm.model.bn1
    before = stem_bn.running_mean.clone()
    pm.model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not stem_bn.training
    assert torch.equal(stem_bn.running_mean, before)
    assert stem_bn.num_batches_tracked.item() == 0
    table = M.trainable_summary(pm)
    assert table[0]["batchnorm"] == "frozen stats"


def test_train_bn_keeps_affine_trainable_but_statistics_frozen():
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    M.freeze(pm, train_bn=True)
    assert pm.model.bn1.weight.requires_grad
    assert not pm.model.conv_stem.weight.requires_grad
    optimizer = M.make_optimizer(pm, lr=0.05)
    before = _snapshot(pm.model)
    _train_steps(pm, optimizer, steps=2, size=32)
    after = pm.model.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"])
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])


def test_unfreeze_wakes_batchnorm_with_the_model_mode():
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    M.freeze(pm, bn_stats="frozen_groups")
    pm.model.train()
    M.unfreeze(pm)
    assert pm.model.bn1.training
    assert all(M.group_status(pm).values())
    before = pm.model.bn1.running_mean.clone()
    pm.model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, pm.model.bn1.running_mean)


def test_freeze_to_follows_fastai_semantics():
    pm = M.load_pretrained("efficientnet_lite0", weights=None)
    names = pm.groups
    M.freeze_to(pm, 3)
    assert [n for n, t in M.group_status(pm).items() if not t] == names[:3]
    M.freeze_to(pm, -2)
    assert [n for n, t in M.group_status(pm).items() if t] == names[-2:]
    M.freeze(pm)
    assert [n for n, t in M.group_status(pm).items() if t] == ["head"]
    M.freeze_to(pm, 0)
    assert all(M.group_status(pm).values())


@pytest.mark.parametrize("n", [11, -11, 100])
def test_freeze_to_out_of_range_names_the_groups(n):
    pm = M.load_pretrained("efficientnet_lite0", weights=None)
    with pytest.raises(ValueError, match="between -10 and 10") as err:
        M.freeze_to(pm, n)
    assert "stem" in str(err.value)


def test_freeze_accepts_the_bare_module():
    pm = M.load_pretrained("resnet18", weights=None, num_classes=2)
    M.freeze(pm.model)
    assert M.count_parameters(pm.model, trainable_only=True) == 512 * 2 + 2


# ----------------------------------------------------------- learning rates


def test_group_lrs_are_geometric_from_stem_to_head():
    pm = M.load_pretrained("resnet18", weights=None)
    rates = list(M.group_lrs(pm, 1e-2, lr_mult=100).values())
    assert rates[-1] == pytest.approx(1e-2)
    assert rates[0] == pytest.approx(1e-4)
    ratios = np.array(rates[1:]) / np.array(rates[:-1])
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 1


def test_param_groups_hold_frozen_groups_and_skip_decay_on_bn_and_bias():
    pm = M.load_pretrained("resnet18", weights=None, num_classes=3)
    M.freeze_to(pm, -2)
    groups = M.param_groups(pm, 1e-3, lr_mult=10, weight_decay=0.05)
    names = [g["name"] for g in groups]
    assert names == [f"{g}{tail}" for g in pm.groups
                     for tail in ("", "+no_decay")]
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in pm.model.parameters())
    for g in groups:
        if g["name"].endswith("+no_decay"):
            assert g["weight_decay"] == 0
            assert all(p.ndim == 1 for p in g["params"])
        else:
            assert g["weight_decay"] == 0.05
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["layer4"] < lrs["head"] == pytest.approx(1e-3)


def test_param_groups_take_explicit_rates_by_group_name():
    pm = M.load_pretrained("resnet18", weights=None)
    groups = M.param_groups(pm, 1e-3, lrs={"stem": 1e-6})
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["stem"] == 1e-6 and lrs["layer1"] == 1e-3
    with pytest.raises(ValueError, match="groups this model does not"):
        M.param_groups(pm, 1e-3, lrs={"body": 1e-6})


def test_trainable_summary_shows_learning_rates_per_group():
    pm = M.load_pretrained("resnet18", weights=None, num_classes=3)
    M.freeze_to(pm, -2)
    opt = M.make_optimizer(pm, lr=1e-3, lr_mult=10, kind="sgd")
    table = M.trainable_summary(pm, opt)
    rows = {r["group"]: r for r in table}
    assert rows["stem"]["lr"] == pytest.approx(1e-4)
    assert rows["stem"]["trainable"] == 0
    assert rows["head"]["lr"] == pytest.approx(1e-3)
    assert rows["layer4"]["lr"] < 1e-3
    assert rows["total"]["trainable"] == M.count_parameters(
        pm, trainable_only=True)
    text = str(table)
    assert "layer4" in text and "frozen stats" in text
    assert "<td>head</td>" in table._repr_html_()


def test_make_optimizer_rejects_unknown_kind():
    pm = M.load_pretrained("resnet18", weights=None)
    with pytest.raises(ValueError, match="'adamw', 'adam' or 'sgd'"):
        M.make_optimizer(pm, kind="lion")


def test_classify_returns_named_probabilities(lite0):
    top = M.classify(lite0, _photo("coffee"), k=3)
    assert top[0][0] == "espresso" and 0 < top[0][1] <= 1
    assert len(top) == 3


def test_deepcopy_keeps_the_batchnorm_policy():
    pm = M.load_pretrained("efficientnet_lite0", weights=None)
    M.freeze(pm)
    twin = copy.deepcopy(pm.model).train()
    before = twin.bn1.running_mean.clone()
    twin(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, twin.bn1.running_mean)


def test_as_module_unwraps_what_load_pretrained_returns():
    pretrained = M.load_pretrained("efficientnet_lite0", num_classes=3,
                                   weights=None)
    assert M.as_module(pretrained) is pretrained.model
    layer = torch.nn.Linear(2, 2)
    assert M.as_module(layer) is layer
    with pytest.raises(TypeError, match="expected a model"):
        M.as_module("resnet18")



# ------------------------------------------------------ registry records


def _library_eval_transform(name, model):
    """The eval transform the weights' own library builds."""
    if name == "efficientnet_lite0":
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config(model=model))
    return M.torchvision_weights(name).transforms()


@pytest.mark.parametrize("name", [n for n in M.MODEL_NAMES
                                  if M.BACKBONES[n].modality == "image"])
def test_transform_matches_the_weights_own_library_config(name):
    """Resize, crop, interpolation, mean and std come from the weights."""
    pm = M.load_pretrained(name, weights=None,
                           image_size=M.load_pretrained(
                               name, weights=None).meta["crop_size"])
    library = _library_eval_transform(name, pm.model)
    photo = _photo("chelsea")
    ours = pm.transform(photo)
    theirs = library(photo)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5), name
    resize = pm.transform.transforms[0]
    if name == "efficientnet_lite0":
        cfg = pm.model.pretrained_cfg
        assert resize.interpolation.value == cfg["interpolation"]
        assert pm.meta["mean"] == tuple(cfg["mean"])
    else:
        assert [resize.size] == list(library.resize_size)
        assert resize.interpolation == library.interpolation
        assert list(pm.meta["std"]) == list(library.std)


def test_resnet50_resizes_to_its_weights_232_not_a_fixed_ratio():
    pm = M.load_pretrained("resnet50", weights=None)
    assert pm.transform.transforms[0].size == 232
    small = M.load_pretrained("resnet50", weights=None, image_size=112)
    assert small.transform.transforms[0].size == 116


def test_every_record_says_its_modality_licence_and_split():
    for name, record in M.BACKBONES.items():
        assert record.name == name
        assert record.modality in M.MODALITIES
        assert record.licence and record.source
    assert "modality" in M.list_models().columns


def test_custom_split_is_remembered_for_freezing():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))

    def split(model):
        return [("body", [model[0], model[1]]), ("head", [model[5]])]

    groups = M.layer_groups(net, split=split)
    assert list(groups) == ["body", "head"]
    M.freeze(net)
    assert list(M.group_status(net).values()) == [False, True]
    assert not net[0].weight.requires_grad and net[5].weight.requires_grad
    with pytest.raises(TypeError, match="split must be a function"):
        M.layer_groups(net, split="body")


# ------------------------------------------------------ BatchNorm policy


def _stats(bn):
    return bn.running_mean.clone(), bn.num_batches_tracked.item()


def test_frozen_policy_freezes_statistics_in_trainable_groups_too():
    """bn_stats="frozen": no running statistic moves, in any group, while
    the scale and shift of trainable groups still learn."""
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    M.unfreeze(pm, bn_stats="frozen")
    optimizer = M.make_optimizer(pm, lr=0.05)
    before = _snapshot(pm.model)
    _train_steps(pm, optimizer, steps=2, size=32)
    after = pm.model.state_dict()
    for key in before:
        if "running_" in key or "num_batches" in key:
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"])
    assert not torch.equal(before["conv_stem.weight"],
                           after["conv_stem.weight"])


def test_train_policy_updates_statistics_even_in_frozen_groups():
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    M.freeze(pm, bn_stats="train")
    pm.model.train()
    mean, count = _stats(pm.model.bn1)
    pm.model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert not torch.equal(mean, pm.model.bn1.running_mean)
    assert not pm.model.bn1.weight.requires_grad


def test_policy_is_kept_by_later_freezing_copies_and_train():
    pm = M.load_pretrained("efficientnet_lite0", num_classes=3,
                           weights=None)
    assert M.bn_stats_policy(pm) is None      # plain PyTorch until set
    M.freeze(pm)
    assert M.bn_stats_policy(pm) == M.DEFAULT_BN_STATS == "frozen"
    M.freeze(pm, bn_stats="frozen_groups")
    M.unfreeze(pm)                    # no bn_stats: keeps the policy
    assert M.bn_stats_policy(pm) == "frozen_groups"
    M.set_bn_stats(pm, "frozen")
    twin = copy.deepcopy(pm.model).train()
    assert M.bn_stats_policy(twin) == "frozen"
    mean, count = _stats(twin.bn1)
    twin(torch.randn(2, 3, 32, 32))
    assert torch.equal(mean, twin.bn1.running_mean)
    assert twin.bn1.num_batches_tracked.item() == count


def test_trainable_summary_shows_the_policy_per_group():
    pm = M.load_pretrained("resnet18", weights=None, num_classes=3)
    M.freeze_to(pm, -2, bn_stats="frozen_groups")
    pm.model.train()
    table = M.trainable_summary(pm)
    rows = {r["group"]: r for r in table}
    assert rows["stem"]["batchnorm"] == "frozen stats"
    assert rows["layer4"]["batchnorm"] == "train stats"
    assert rows["head"]["batchnorm"] == "-"
    assert "bn_stats='frozen_groups'" in table.title
    M.set_bn_stats(pm, "frozen")
    assert M.trainable_summary(pm)[4]["batchnorm"] == "frozen stats"


def test_unknown_bn_stats_policy_lists_the_valid_ones():
    pm = M.load_pretrained("resnet18", weights=None)
    with pytest.raises(ValueError, match="'frozen_groups'"):
        M.freeze(pm, bn_stats="fixed")


def test_no_notebook_or_solution_patches_batchnorm_with_a_hook():
    """The course keeps BatchNorm statistics in check with bn_stats: no
    notebook, hint or solution registers a forward hook of its own."""
    root = Path(__file__).resolve().parents[1]
    texts = {path.name: path.read_text(encoding="utf-8")
             for path in sorted((root / "notebooks").glob("*.ipynb"))}
    assert len(texts) >= 7
    texts["exercises.py"] = (root / "tlhelpers" / "exercises.py").read_text(
        encoding="utf-8")
    hooked = [name for name, text in texts.items()
              if "register_forward" in text]
    assert hooked == [], f"hand-written forward hooks in {hooked}"


def test_eval_mode_gives_back_the_models_mode_even_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    with M.eval_mode(net.train()) as inside:
        assert inside is net and not net.training
        assert not net[1].training
    assert net.training and net[1].training
    with pytest.raises(RuntimeError, match="boom"):
        with M.eval_mode(net):
            raise RuntimeError("boom")
    assert net.training
    with M.eval_mode(net.eval()):
        pass
    assert not net.training
