"""Tests for tlhelpers.strategies: vocabulary, careful recipe, comparisons."""

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tlhelpers import data, kernels, models
from tlhelpers import strategies as S


class TinyNet(nn.Module):
    """A miniature of the lite0 layout: stem, two blocks, neck, head."""

    def __init__(self, num_classes=3, width=4):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1),
                          nn.BatchNorm2d(width), nn.ReLU())
            for _ in range(2)])
        self.conv_head = nn.Conv2d(width, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv_stem(x)))
        x = torch.relu(self.bn2(self.conv_head(self.blocks(x))))
        return self.classifier(x.mean((2, 3)))


def toy_data(n=48, seed=0):
    """Learnable 3-class tensors: the class's channel is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


def loaders(batch_size=8):
    train = DataLoader(toy_data(), batch_size=batch_size, shuffle=True)
    return train, DataLoader(toy_data(24, seed=1), batch_size=8)


def _tiny_factory(weights):
    return TinyNet()


def _image_dataset(n, seed):
    x, y = toy_data(n, seed).tensors
    return data.LabelledImages(list(x), y.tolist(), ["r", "g", "b"])


# ------------------------------------------------------------ vocabulary


def test_one_vocabulary_describes_every_strategy():
    assert S.NAMES == ("from_scratch", "feature_extraction", "head_only",
                       "last_k", "naive_fine_tuning", "fine_tuning",
                       "gradual_unfreezing")
    table = S.describe()
    assert table.column("strategy") == list(S.NAMES)
    for row in table:
        assert row["what"] and row["trains"] and row["rates"]


def test_old_name_full_fine_tuning_explains_the_rename():
    with pytest.raises(ValueError, match="'naive_fine_tuning'") as err:
        S.check_strategy("full_fine_tuning")
    assert "'fine_tuning'" in str(err.value)
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        S.check_strategy("magic")


def test_training_no_longer_needs_features():
    import ast
    import inspect

    from tlhelpers import training

    tree = ast.parse(inspect.getsource(training))
    imported = {a.name for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "tlhelpers"
                for a in n.names}
    assert "features" not in imported and "strategies" not in imported


# ----------------------------------------------------- the careful recipe


def test_fine_tuning_schedule_warms_up_the_head_then_every_group():
    model = TinyNet()
    plan = S.fine_tuning_schedule(model, lr=1e-2, warmup_epochs=2,
                                  lr_mult=100)
    timeline = plan.timeline()
    assert timeline[0] == ("head", 1, 1e-2)
    assert {e for g, e, _ in timeline[1:]} == {3}
    assert timeline[-1][0] == "stem"
    assert timeline[-1][2] == pytest.approx(1e-4)
    assert plan.trainable_groups(2) == ["head"]
    assert len(plan.trainable_groups(3)) == 5


def test_fine_tune_trains_head_first_then_all_with_frozen_statistics():
    torch.manual_seed(0)
    model = TinyNet()
    stem, stem_stats = (model.conv_stem.weight.clone(),
                        model.bn1.running_mean.clone())
    seen = {}

    class Watch:
        def update(self, history):
            seen[history[-1]["epoch"]] = dict(models.group_status(model))
            if history[-1]["epoch"] == 1:
                assert torch.equal(model.conv_stem.weight, stem)

    train, val = loaders()
    h = S.fine_tune(model, train, val, epochs=3, lr=1e-2, warmup_epochs=1,
                    lr_mult=10, live=Watch(), progress=False)
    assert list(seen[1].values()) == [False] * 4 + [True]
    assert all(seen[2].values()) and all(seen[3].values())
    assert not torch.equal(model.conv_stem.weight, stem)
    assert torch.equal(model.bn1.running_mean, stem_stats)  # "frozen"
    assert models.bn_stats_policy(model) == "frozen"
    assert h[-1]["lrs"]["stem"] == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine"])
def test_fine_tune_runs_a_schedule_across_the_unfreeze(schedule):
    model = TinyNet()
    h = S.fine_tune(model, loaders()[0], None, epochs=3, lr=1e-2,
                    schedule=schedule, progress=False)
    ratios = [row["lrs"]["stem"] / row["lrs"]["head"] for row in h.epochs]
    assert ratios == pytest.approx([1 / S.LR_MULT] * 3)
    heads = [row["lrs"]["head"] for row in h.epochs]
    assert len(set(heads)) == 3   # the schedule moved the rates


class _StopAfter:
    """A live hook that interrupts the run after one epoch, as Ctrl-C."""

    def __init__(self, epoch):
        self.epoch = epoch

    def update(self, history):
        if history[-1]["epoch"] == self.epoch:
            raise KeyboardInterrupt


def _fine_tune_run(seed, path, schedule, stop_after=None, resume=False):
    torch.manual_seed(seed)
    model = TinyNet()
    train, val = loaders()
    history = S.fine_tune(
        model, train, val, epochs=4, lr=1e-2, warmup_epochs=1,
        schedule=schedule, checkpoint=path, resume=resume,
        live=_StopAfter(stop_after) if stop_after else None,
        progress=False)
    return model, history


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine"])
def test_fine_tune_stopped_after_the_unfreeze_resumes_exactly(tmp_path,
                                                              schedule):
    """The schedule runs across the unfreeze and resumes bit-identical."""
    full_model, full = _fine_tune_run(0, tmp_path / "full.pt", schedule)
    path = tmp_path / "stopped.pt"
    _, part = _fine_tune_run(0, path, schedule, stop_after=2)
    assert len(part) == 2
    assert {e["epoch"] for e in part.events} == {1, 2}  # unfrozen
    # a fresh process: other initial weights, same code
    model, resumed = _fine_tune_run(7, path, schedule, resume=True)
    assert len(resumed) == 4
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    drop_time = [{k: v for k, v in row.items() if k != "time"}
                 for row in full.epochs]
    assert [{k: v for k, v in row.items() if k != "time"}
            for row in resumed.epochs] == drop_time


def test_fine_tune_without_warm_up_trains_every_group_from_epoch_one():
    model = TinyNet()
    seen = {}

    class Watch:
        def update(self, history):
            seen[history[-1]["epoch"]] = dict(models.group_status(model))

    S.fine_tune(model, loaders()[0], None, epochs=2, lr=1e-2,
                warmup_epochs=0, live=Watch(), progress=False)
    assert all(seen[1].values()) and all(seen[2].values())
    with pytest.raises(ValueError, match="warmup_epochs must be an int"):
        S.fine_tune(TinyNet(), loaders()[0], epochs=2, warmup_epochs=-1)


def test_fine_tune_needs_epochs_after_the_warm_up():
    with pytest.raises(ValueError, match="fewer than epochs"):
        S.fine_tune(TinyNet(), loaders()[0], epochs=1, warmup_epochs=1)


def test_naive_fine_tuning_trains_everything_and_its_statistics():
    model = TinyNet()
    stats = model.bn1.running_mean.clone()
    S.naive_fine_tune(model, loaders()[0], None, epochs=1, progress=False)
    assert all(models.group_status(model).values())
    assert not torch.equal(stats, model.bn1.running_mean)


# --------------------------------------------------- compare strategies


def test_compare_strategies_tabulates_every_strategy_on_one_budget():
    train, test = _image_dataset(30, 0), _image_dataset(15, 1)
    table = S.compare_strategies(train, test, model=_tiny_factory, epochs=2,
                                 batch_size=8, progress=False)
    assert table.column("strategy") == [
        "from_scratch", "feature_extraction", "head_only", "last_2_groups",
        "naive_fine_tuning", "fine_tuning", "gradual_unfreezing"]
    params = dict(zip(table.column("strategy"),
                      table.column("trainable_params")))
    total = models.count_parameters(TinyNet())
    assert params["from_scratch"] == params["naive_fine_tuning"] == total
    assert params["fine_tuning"] == total
    assert params["head_only"] == params["feature_extraction"] == 8 * 3 + 3
    assert params["last_2_groups"] == 27 + 8 * 4 + 8 + 16
    for row in table:
        assert 0 <= row["accuracy_min"] <= row["accuracy"]
        assert row["accuracy"] <= row["accuracy_max"] <= 1
        assert row["seeds"] == 1
        assert row["seconds"] > 0 and row["peak_mem_mb"] >= 0


def test_compare_strategies_over_seeds_reports_mean_min_and_max():
    train, test = _image_dataset(30, 0), _image_dataset(30, 1)
    table = S.compare_strategies(
        train, test, model=_tiny_factory, epochs=2, batch_size=8,
        strategies=["from_scratch", "head_only"], labels_per_class=[3, 6],
        seeds=[0, 1, 2], progress=False)
    assert table.column("labels_per_class") == [3, 3, 6, 6]
    assert len(table.runs) == 12
    for row in table:
        accs = [r["accuracy"] for r in table.runs
                if r["strategy"] == row["strategy"]
                and r["labels_per_class"] == row["labels_per_class"]]
        assert sorted(r["seed"] for r in table.runs
                      if r["strategy"] == row["strategy"]
                      and r["labels_per_class"] == row[
                          "labels_per_class"]) == [0, 1, 2]
        assert row["accuracy"] == pytest.approx(sum(accs) / 3)
        assert row["accuracy_min"] == min(accs)
        assert row["accuracy_max"] == max(accs)
    assert S.spread(table, "head_only", 3) == (
        table[1]["accuracy"], table[1]["accuracy_min"],
        table[1]["accuracy_max"])
    assert "3 seeds" in table.title


def test_compare_strategies_rejects_unknown_strategies_and_seeds():
    with pytest.raises(ValueError, match="unknown strategy"):
        S.compare_strategies(None, None, strategies=["magic"])
    with pytest.raises(ValueError, match="seeds must be"):
        S.compare_strategies(None, None, strategies=["head_only"],
                             seeds=[])


def test_peak_memory_sees_a_large_allocation():
    with S._PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64, 2 ** 20 // 4)  # 64 MB of float32
        block += 1
        # Long enough for the 5 ms sampler thread to run on a busy machine.
        time.sleep(0.5)
    del block
    assert mem.mb > 40


def test_peak_memory_counts_a_block_that_reuses_freed_memory():
    # With the course's allocator, malloc keeps up to 256 MB after a free;
    # a later block reuses it without growing the resident set, which is
    # what an earlier strategy in compare_strategies leaves behind.
    kernels.tune_allocator()
    earlier = [torch.ones(2 ** 20) + 1 for _ in range(24)]  # 24 x 4 MB
    del earlier
    with S._PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64, 2 ** 20 // 4)
        block += 1
        time.sleep(0.5)
    del block
    assert mem.mb > 40
