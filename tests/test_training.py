"""Tests for tlhelpers.training: fit, history, checkpoints, schedules."""

import copy
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset

from tlhelpers import data, files, models
from tlhelpers import training as T

GROUPS = ["stem", "stage1", "stage2", "neck", "head"]


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
        self.drop = nn.Dropout(0.3)  # so that resuming needs the RNG state
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv_stem(x)))
        x = torch.relu(self.bn2(self.conv_head(self.blocks(x))))
        return self.classifier(self.drop(x.mean((2, 3))))


def toy_data(n=48, seed=0, flip=False):
    """Learnable 3-class tensors: the class's channel is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x[torch.arange(n), y] += 1.5
    if flip:  # labels that disagree with training: validation loss rises
        y = (y + 1) % 3
    return TensorDataset(x, y)


def loaders(batch_size=8, flip=False):
    train = DataLoader(toy_data(), batch_size=batch_size, shuffle=True)
    val = DataLoader(toy_data(24, seed=1, flip=flip), batch_size=8)
    return train, val


def setup(seed=0, lr=1e-2, freeze=False):
    torch.manual_seed(seed)
    model = TinyNet()
    if freeze:
        models.freeze(model)
    return model, models.make_optimizer(model, lr=lr)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optimizer_state(a, b):
    if a["param_groups"] != b["param_groups"]:
        return False
    if a["state"].keys() != b["state"].keys():
        return False
    return all(same_state(a["state"][k], b["state"][k]) for k in a["state"])


def rows_without_time(history):
    return [{k: v for k, v in row.items() if k != "time"}
            for row in history.epochs]


class Recorder:
    """A live hook that keeps what it sees and can stop the run."""

    def __init__(self, model=None, optimizer=None, stop_after=None):
        self.model, self.optimizer = model, optimizer
        self.stop_after = stop_after
        self.seen, self.states, self.status, self.lrs = [], {}, {}, {}
        self.closed = False

    def update(self, history):
        epoch = history[-1]["epoch"]
        self.seen.append(len(history))
        if self.model is not None:
            self.states[epoch] = T._copy_state(self.model)
            self.status[epoch] = dict(models.group_status(self.model))
        if self.optimizer is not None:
            self.lrs[epoch] = T._named_lrs(self.optimizer)
        if epoch == self.stop_after:
            raise KeyboardInterrupt

    def close(self):
        self.closed = True


# ---------------------------------------------------------------- history


def test_history_records_metrics_rates_and_time_for_every_epoch():
    model, opt = setup()
    train, val = loaders()
    h = T.fit(model, train, val, opt, 3, progress=False)
    assert len(h) == 3 and h["epoch"] == [1, 2, 3]
    for row in h.epochs:
        assert set(row) == {"epoch", "train_loss", "train_acc", "val_loss",
                            "val_acc", "lrs", "time"}
        assert math.isfinite(row["train_loss"]) and row["time"] > 0
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
        assert row["lrs"] == {name: 1e-2 for name in (
            "stem", "stem+no_decay", "stage1", "stage1+no_decay", "stage2",
            "stage2+no_decay", "neck", "neck+no_decay", "head",
            "head+no_decay")}
    losses = h["val_loss"]
    assert h.best_epoch == losses.index(min(losses)) + 1
    assert "val_loss" in h._repr_html_() and "lr head" in str(h)
    with pytest.raises(KeyError, match="val_acc"):
        h["val_accuracy"]


def test_history_metrics_match_evaluate_on_the_same_data():
    model, opt = setup()
    train, val = loaders()
    h = T.fit(model, train, val, opt, 2, progress=False, keep_best=False)
    result = T.evaluate(model, val)
    assert h[-1]["val_loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert h[-1]["val_acc"] == result["accuracy"]


def test_history_records_the_rate_each_epoch_started_with():
    model, opt = setup(lr=0.1)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    h = T.fit(model, loaders()[0], None, opt, 3, scheduler=sched,
              progress=False)
    assert [row["lrs"]["head"] for row in h.epochs] == pytest.approx(
        [0.1, 0.05, 0.025])


def test_fit_takes_exactly_the_steps_of_a_bare_loop():
    model, opt = setup()
    torch.manual_seed(1)
    T.fit(model, loaders()[0], None, opt, 2, progress=False,
          keep_best=False)
    bare, bare_opt = setup()
    torch.manual_seed(1)
    loader = loaders()[0]
    bare.train()
    for _ in range(2):
        for x, y in loader:
            bare_opt.zero_grad()
            nn.functional.cross_entropy(bare(x), y).backward()
            bare_opt.step()
    assert same_state(model.state_dict(), bare.state_dict())


def test_fit_accepts_the_pretrained_wrapper():
    model, opt = setup()
    wrapped = models.Pretrained(name="tiny", model=model, transform=None,
                                train_transform=None, categories=[],
                                groups=GROUPS)
    h = T.fit(wrapped, loaders()[0], None, opt, 1, progress=False)
    assert len(h) == 1 and h.monitor == "train_loss"


def test_keep_best_restores_the_best_epoch_weights():
    model, opt = setup(lr=3e-2)
    train, val = loaders(flip=True)
    rec = Recorder(model)
    h = T.fit(model, train, val, opt, 5, progress=False, live=rec)
    assert h.best_epoch < 5
    assert same_state(model.state_dict(), rec.states[h.best_epoch])
    assert f"restored the weights of epoch {h.best_epoch}" in h.notes[-1]


def test_keep_best_false_ends_with_the_last_weights():
    model, opt = setup(lr=3e-2)
    train, val = loaders(flip=True)
    rec = Recorder(model)
    T.fit(model, train, val, opt, 4, progress=False, live=rec,
          keep_best=False)
    assert same_state(model.state_dict(), rec.states[4])


def test_early_stopping_stops_when_patience_runs_out():
    model, opt = setup(lr=3e-2)
    train, val = loaders(flip=True)
    h = T.fit(model, train, val, opt, 20, progress=False, early_stopping=2)
    assert len(h) == h.best_epoch + 2 < 20
    assert any("stopped early" in n for n in h.notes)


def test_early_stopping_on_accuracy_waits_for_a_higher_value():
    stopper = T.EarlyStopping(patience=2, monitor="val_acc", min_delta=0.05)
    h = T.History("val_acc", epochs=[{"epoch": i + 1, "val_acc": a}
                                     for i, a in enumerate([.5, .6, .62])])
    assert stopper.epochs_without_improvement(h) == 1
    assert not stopper.should_stop(h)
    h.epochs.append({"epoch": 4, "val_acc": 0.64})
    assert stopper.should_stop(h)


def test_early_stopping_on_validation_without_val_loader_says_what_to_do():
    model, opt = setup()
    with pytest.raises(ValueError, match="no val_loader"):
        T.fit(model, loaders()[0], None, opt, 2, progress=False,
              early_stopping=2)


@pytest.mark.parametrize("bad, match", [
    (dict(epochs=0), "epochs must be"),
    (dict(clip_grad=-1.0), "clip_grad must be"),
    (dict(resume=True), "needs checkpoint"),
    (dict(early_stopping="3"), "early_stopping must be"),
])
def test_fit_rejects_bad_arguments_with_a_clear_message(bad, match):
    model, opt = setup()
    kw = dict(epochs=1, progress=False)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        T.fit(model, loaders()[0], None, opt, **kw)


def test_progress_false_is_silent_and_true_shows_bars(capsys):
    model, opt = setup()
    T.fit(model, loaders()[0], None, opt, 1, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    T.fit(model, loaders()[0], None, opt, 1, progress=True)
    assert "epoch" in capsys.readouterr().err


def test_live_hook_sees_every_epoch_and_is_closed():
    model, opt = setup()
    rec = Recorder()
    T.fit(model, loaders()[0], None, opt, 3, progress=False, live=rec)
    assert rec.seen == [1, 2, 3] and rec.closed
    with pytest.raises(TypeError, match="update"):
        T.fit(model, loaders()[0], None, opt, 1, progress=False,
              live=object())


def test_clip_grad_bounds_every_step():
    model, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone()
                        for p in model.parameters()])
    one_batch = DataLoader(toy_data(8), batch_size=8)
    T.fit(model, one_batch, None, opt, 1, progress=False, clip_grad=1e-3,
          keep_best=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 1e-3 * (1 + 1e-4)
    assert (after - before).norm() > 0


def test_amp_on_cpu_warns_and_trains_in_float32():
    model, opt = setup()
    with pytest.warns(UserWarning, match="CUDA"):
        h = T.fit(model, loaders()[0], None, opt, 1, progress=False,
                  amp=True, device="cpu")
    assert math.isfinite(h[0]["train_loss"])


def test_scheduler_stepping_one_cycle_per_batch_and_plateau_per_epoch():
    model, opt = setup()
    train = loaders()[0]
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.01,
                                    total_steps=3 * len(train))
    T.fit(model, train, None, opt, 3, scheduler=sched, progress=False)
    assert sched.last_epoch == 3 * len(train)
    model, opt = setup()
    plateau = lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    train, val = loaders(flip=True)
    h = T.fit(model, train, val, opt, 4, scheduler=plateau, progress=False)
    assert h[-1]["lrs"]["head"] < 1e-2


# ------------------------------------------------------- divergence


def test_nan_loss_stops_with_the_learning_rate_in_the_message():
    model, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e12)
    train, val = loaders()
    with pytest.raises(FloatingPointError) as info:
        T.fit(model, train, val, opt, 3, progress=False)
    message = str(info.value)
    assert "learning rate 1.00e+12" in message
    assert "lower learning rate" in message and "1.00e+11" in message
    assert isinstance(info.value.history, T.History)
    # the weights went back to sane values, not left as NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_infinite_loss_names_every_group_rate():
    model, _ = setup()
    opt = models.make_optimizer(model, lr=1e-3, lr_mult=10)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * math.inf if len(calls) > 8 else loss

    with pytest.raises(FloatingPointError, match="epoch 2") as info:
        T.fit(model, loaders()[0], None, opt, 3, loss_fn=loss_fn,
              progress=False)
    assert "head=1.00e-03" in str(info.value)
    assert "stem=1.00e-04" in str(info.value)
    assert len(info.value.history) == 1


def test_nan_inside_a_long_epoch_stops_without_finishing_it(monkeypatch):
    monkeypatch.setattr(T, "SYNC_SECONDS", 0.0)  # read the loss every step
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * math.nan if len(calls) == 3 else loss

    model, opt = setup()
    with pytest.raises(FloatingPointError, match="by batch 3"):
        T.fit(model, loaders()[0], None, opt, 2, loss_fn=loss_fn,
              progress=False)
    assert len(calls) == 3


# ------------------------------------------------- Ctrl-C and resume


def test_keyboard_interrupt_keeps_history_and_best_weights(capsys):
    model, opt = setup(lr=3e-2)
    train, val = loaders(flip=True)
    rec = Recorder(model, stop_after=3)
    h = T.fit(model, train, val, opt, 10, progress=True, live=rec)
    assert len(h) == 3 and rec.closed
    assert "interrupted (Ctrl-C) after 3 finished epochs" in h.notes[-1]
    assert same_state(model.state_dict(), rec.states[h.best_epoch])
    assert "interrupted" in capsys.readouterr().out


def test_keyboard_interrupt_inside_an_epoch_drops_only_that_epoch():
    model, opt = setup()
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 15:  # batch 3 of epoch 3
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, y)

    h = T.fit(model, loaders()[0], None, opt, 5, loss_fn=loss_fn,
              progress=False)
    assert h["epoch"] == [1, 2]


def _resumable_run(seed, checkpoint, stop_after=None, loss_fn=None,
                   resume=False, schedule="one_cycle"):
    model, _ = setup(seed=seed, freeze=True)
    train, val = loaders()
    unfreezing = T.GradualUnfreezing(["head", "neck", "stage2"], lr=1e-2,
                                     bn_stats="frozen_groups")
    opt = unfreezing.make_optimizer(model)
    if schedule == "one_cycle":
        sched = lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=5 * len(train))
    else:
        sched = lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    h = T.fit(model, train, val, opt, 5, scheduler=sched,
              checkpoint=checkpoint, resume=resume, unfreezing=unfreezing,
              live=Recorder(stop_after=stop_after), loss_fn=loss_fn,
              progress=False)
    return model, opt, sched, h


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine"])
@pytest.mark.parametrize("where", ["between epochs", "inside an epoch"])
def test_interrupted_run_resumed_from_checkpoint_ends_bit_identical(
        tmp_path, where, schedule):
    """A one-cycle or cosine schedule across unfreezes resumes exactly."""
    full = _resumable_run(0, tmp_path / "full.pt", schedule=schedule)
    calls = []

    def crash_in_epoch_4(out, y):
        calls.append(1)
        if len(calls) == 3 * 9 + 2:  # 6 train + 3 val batches per epoch
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, y)

    path = tmp_path / "ckpt.pt"
    if where == "between epochs":
        _, _, _, h = _resumable_run(0, path, stop_after=2,
                                    schedule=schedule)
        assert len(h) == 2
    else:
        _, _, _, h = _resumable_run(0, path, loss_fn=crash_in_epoch_4,
                                    schedule=schedule)
        assert len(h) == 3
    # a fresh process: other seed, other initial weights, same code
    torch.manual_seed(123)
    resumed = _resumable_run(7, path, resume=True, schedule=schedule)
    model, opt, sched, history = resumed
    assert same_state(model.state_dict(), full[0].state_dict())
    assert same_optimizer_state(opt.state_dict(), full[1].state_dict())
    assert sched.state_dict() == full[2].state_dict()
    assert rows_without_time(history) == rows_without_time(full[3])
    assert history.events == full[3].events
    assert any("resumed" in n for n in history.notes)


def test_resumed_run_still_ends_with_the_best_weights_of_before(tmp_path):
    def run(seed, path, stop_after=None, resume=False):
        model, opt = setup(seed=seed, lr=3e-2)
        train, val = loaders(flip=True)  # best epoch early, then worse
        rec = Recorder(model, stop_after=stop_after)
        h = T.fit(model, train, val, opt, 5, checkpoint=path, resume=resume,
                  live=rec, progress=False)
        return model, h, rec

    full, full_h, full_rec = run(0, tmp_path / "full.pt")
    _, part_h, _ = run(0, tmp_path / "c.pt", stop_after=3)
    assert full_h.best_epoch < len(part_h)  # best found before the stop
    model, h, _ = run(9, tmp_path / "c.pt", resume=True)
    assert h.best_epoch == full_h.best_epoch
    assert same_state(model.state_dict(),
                      full_rec.states[full_h.best_epoch])


def test_every_random_state_round_trips_through_a_checkpoint(tmp_path):
    loader = DataLoader(toy_data(), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(3))

    def draw():
        return (random.random(), np.random.rand(), torch.rand(3).tolist(),
                [y.tolist() for _, y in loader])

    files.save(T._rng_state(loader), tmp_path / "rng.pt")
    first = draw()
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    T._set_rng_state(saved, loader)
    assert draw() == first


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    path = tmp_path / "done.pt"
    model, opt = setup()
    train, val = loaders()
    first = T.fit(model, train, val, opt, 2, checkpoint=path,
                  progress=False)

    def must_not_run(out, y):
        raise AssertionError("a finished run must not train again")

    model2, opt2 = setup(seed=5)
    again = T.fit(model2, train, val, opt2, 2, checkpoint=path, resume=True,
                  loss_fn=must_not_run, progress=False)
    assert rows_without_time(again) == rows_without_time(first)
    assert same_state(model2.state_dict(), model.state_dict())


def test_resume_without_a_checkpoint_file_starts_fresh(tmp_path):
    model, opt = setup()
    h = T.fit(model, loaders()[0], None, opt, 1, progress=False,
              checkpoint=tmp_path / "new.pt", resume=True)
    assert len(h) == 1 and (tmp_path / "new.pt").exists()


def test_resume_from_a_checkpoint_of_another_model_says_what_to_do(
        tmp_path):
    path = tmp_path / "c.pt"
    model, opt = setup()
    T.fit(model, loaders()[0], None, opt, 1, checkpoint=path,
          progress=False)
    other = TinyNet(width=6)
    with pytest.raises(ValueError, match="does not fit"):
        T.fit(other, loaders()[0], None, models.make_optimizer(other), 2,
              checkpoint=path, resume=True, progress=False)


def test_checkpoint_is_never_left_half_written(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    model, opt = setup()
    real_save = torch.save
    calls = []

    def save_then_crash(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        T.fit(model, loaders()[0], None, opt, 3, checkpoint=path,
              progress=False)
    monkeypatch.undo()
    assert T._read_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]


# ------------------------------------------------- evaluate and predict


def test_evaluate_matches_a_manual_computation_and_keeps_the_mode():
    model, _ = setup()
    model.train()
    val = loaders()[1]
    result = T.evaluate(model, val)
    assert model.training
    model.eval()
    x, y = toy_data(24, seed=1).tensors
    with torch.no_grad():
        out = model(x)
    assert result["loss"] == pytest.approx(
        nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    assert result["accuracy"] == (out.argmax(1) == y).sum().item() / 24


def test_predict_accepts_loader_dataset_and_tensor():
    model, _ = setup()
    dataset = toy_data(20)
    from_loader = T.predict(model, DataLoader(dataset, batch_size=6))
    from_dataset = T.predict(model, dataset, batch_size=7)
    from_tensor = T.predict(model, dataset.tensors[0])
    assert torch.equal(from_loader.preds, from_dataset.preds)
    assert torch.equal(from_dataset.preds, from_tensor.preds)
    assert from_loader.probs.shape == (20, 3)
    assert torch.allclose(from_loader.probs.sum(1), torch.ones(20))
    assert torch.equal(from_dataset.targets, dataset.tensors[1])
    assert from_tensor.targets is None and from_tensor.accuracy is None
    assert 0 <= from_dataset.accuracy <= 1
    with pytest.raises(TypeError, match="DataLoader"):
        T.predict(model, [1, 2, 3])


# ------------------------------------------------- gradual unfreezing


def _plan_and_optimizer(schedule, lr=0.01, **kwargs):
    model, _ = setup(freeze=True)
    plan = T.GradualUnfreezing(schedule, lr=lr, **kwargs)
    return model, plan, plan.make_optimizer(model)


def test_unfreezing_schedule_sets_trainable_groups_and_rates_each_epoch():
    model, plan, opt = _plan_and_optimizer({"head": 1, "neck": 2,
                                            "stage2": 4})
    rec = Recorder(model, opt)
    h = T.fit(model, loaders()[0], None, opt, 5, unfreezing=plan,
              progress=False, live=rec)
    trainable = {e: [g for g, on in s.items() if on]
                 for e, s in rec.status.items()}
    assert trainable == {1: ["head"], 2: ["neck", "head"],
                         3: ["neck", "head"],
                         4: ["stage2", "neck", "head"],
                         5: ["stage2", "neck", "head"]}
    expected = {"head": 0.01, "neck": 0.01 / 2.6, "stage2": 0.01 / 2.6 ** 2,
                "stage1": 0.01 / 2.6 ** 3, "stem": 0.01 / 2.6 ** 4}
    for epoch in (1, 2, 5):  # every group is there from the start
        assert rec.lrs[epoch] == pytest.approx(
            {f"{g}{tail}": lr for g, lr in expected.items()
             for tail in ("", "+no_decay")})
    assert h.events == [
        {"epoch": 1, "kind": "unfreeze", "group": "head", "lr": 0.01},
        {"epoch": 2, "kind": "unfreeze", "group": "neck", "lr": 0.01 / 2.6},
        {"epoch": 4, "kind": "unfreeze", "group": "stage2",
         "lr": 0.01 / 2.6 ** 2}]


def test_unfreezing_changes_no_optimizer_state_but_requires_grad():
    model, plan, opt = _plan_and_optimizer(["head", "neck"])
    before = [dict(g, params=[id(p) for p in g["params"]])
              for g in opt.param_groups]
    plan.apply(model, 1)
    plan.apply(model, 2)
    after = [dict(g, params=[id(p) for p in g["params"]])
             for g in opt.param_groups]
    assert before == after
    assert models.group_status(model)["neck"]
    assert not models.group_status(model)["stage2"]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_frozen_groups_stay_bit_identical_in_an_optimizer_that_holds_them(
        kind):
    """Momentum and weight decay never touch a frozen parameter: freezing
    clears its gradient and the optimizer skips it."""
    model, _ = setup(freeze=True)
    plan = T.GradualUnfreezing(["head", "neck"], lr=0.05, weight_decay=0.1)
    opt = plan.make_optimizer(model, kind=kind)
    if kind == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9
    # first train everything, so momentum and gradients exist everywhere
    models.unfreeze(model)
    T.fit(model, loaders()[0], None, opt, 1, progress=False,
          keep_best=False)
    assert all(p.grad is not None for p in model.parameters())
    frozen = ("conv_stem.", "bn1.", "blocks.")
    before = {k: v.clone() for k, v in model.state_dict().items()
              if k.startswith(frozen)}
    head_before = model.classifier.weight.clone()
    T.fit(model, loaders()[0], None, opt, 3, unfreezing=plan,
          progress=False, keep_best=False)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} moved"
    assert not torch.equal(head_before, model.classifier.weight)


def test_unfreezing_with_plateau_scheduler_steps_every_group():
    model, plan, opt = _plan_and_optimizer(["head", "neck"])
    plateau = lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    train, val = loaders(flip=True)
    h = T.fit(model, train, val, opt, 3, scheduler=plateau, unfreezing=plan,
              progress=False)
    assert len(plateau.min_lrs) == len(opt.param_groups)
    ratios = _lr_ratio_over_epochs(h, "neck")
    assert ratios == pytest.approx([1 / 2.6] * 3)


def _lr_ratio_over_epochs(history, group):
    return [row["lrs"][group] / row["lrs"]["head"] for row in history.epochs
            if group in row["lrs"]]


@pytest.mark.parametrize("make", [
    lambda opt, steps: lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=steps * 6),
    lambda opt, steps: lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
    lambda opt, steps: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt, steps: lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e),
    lambda opt, steps: lr_scheduler.SequentialLR(opt, [
        lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
        lr_scheduler.ExponentialLR(opt, gamma=0.8)], milestones=[2]),
], ids=["one_cycle", "cosine", "step", "lambda", "sequential"])
def test_schedulers_run_across_unfreezes_at_each_groups_scale(make):
    model, plan, opt = _plan_and_optimizer(["head", "neck", "stage2"],
                                           every=2)
    sched = make(opt, 5)
    h = T.fit(model, loaders()[0], None, opt, 5, scheduler=sched,
              unfreezing=plan, progress=False)
    assert len(h) == 5
    for group, ratio in (("neck", 1 / 2.6), ("stage2", 1 / 2.6 ** 2)):
        ratios = _lr_ratio_over_epochs(h, group)
        assert ratios == pytest.approx([ratio] * 5, rel=1e-6)
    assert len(sched.get_last_lr()) == len(opt.param_groups)


def test_unfreezing_table_and_timeline_describe_the_schedule():
    plan = T.GradualUnfreezing(["neck", "stage2"], lr=1e-3, every=3)
    assert plan.timeline() == [("head", 1, 1e-3), ("neck", 4, 1e-3 / 2.6),
                               ("stage2", 7, 1e-3 / 2.6 ** 2)]
    table = plan.table()
    assert table.column("group") == ["head", "neck", "stage2"]
    assert table.column("unfreezes at epoch") == [1, 4, 7]
    assert "stage2" in plan._repr_html_()
    assert plan.trainable_groups(4) == ["head", "neck"]
    explicit = T.GradualUnfreezing({"head": 1, "neck": (2, 5e-4)}, lr=1e-3)
    assert explicit.timeline()[1] == ("neck", 2, 5e-4)


@pytest.mark.parametrize("schedule, match", [
    ({"head": 1, "stage1": 2}, "from the head down without gaps"),
    ({"head": 1, "neck": 3, "stage2": 2}, "cannot unfreeze before"),
    ({"head": 2}, "must train from epoch 1"),
    ({"head": 1, "body": 2}, "unknown layer group 'body'"),
    ({"head": 1, "neck": 0}, "epochs count from 1"),
])
def test_bad_unfreezing_schedules_are_explained(schedule, match):
    model, _ = setup(freeze=True)
    with pytest.raises(ValueError, match=match):
        plan = T.GradualUnfreezing(schedule, lr=0.01)
        plan.apply(model, 1)


def test_fit_refuses_an_optimizer_without_the_scheduled_groups():
    model, _ = setup(freeze=True)
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=0.01)
    plan = T.GradualUnfreezing(["head", "neck"], lr=0.01)
    with pytest.raises(ValueError, match="unfreezing.make_optimizer"):
        T.fit(model, loaders()[0], None, opt, 2, unfreezing=plan,
              progress=False)


def test_fit_warns_when_the_optimizer_ignores_the_schedules_rates():
    model, opt = setup(freeze=True)  # every group at one rate
    plan = T.GradualUnfreezing(["head", "neck"], lr=0.01)
    with pytest.warns(UserWarning, match="do not follow the schedule"):
        T.fit(model, loaders()[0], None, opt, 1, unfreezing=plan,
              progress=False)


def test_fit_with_everything_frozen_says_what_to_do():
    model, opt = setup()
    models.freeze_to(model, len(models.layer_groups(model)))
    with pytest.raises(ValueError, match="nothing trains in epoch 1"):
        T.fit(model, loaders()[0], None, opt, 1, progress=False)


def test_checkpoint_keeps_the_batchnorm_policy(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, _ = setup()
    models.freeze(model, bn_stats="train")
    opt = models.make_optimizer(model)
    T.fit(model, loaders()[0], None, opt, 1, checkpoint=path,
          progress=False)
    other, _ = setup(seed=1)
    models.unfreeze(other, bn_stats="frozen")
    opt = models.make_optimizer(other)
    T.fit(other, loaders()[0], None, opt, 2, checkpoint=path, resume=True,
          progress=False)
    assert models.bn_stats_policy(other) == "train"
    assert list(models.group_status(other).values()) == [
        False] * 4 + [True]


# ------------------------------------------------------------- lr_find


def test_lr_find_restores_weights_optimizer_and_random_state():
    model, opt = setup()
    train = loaders()[0]
    T.fit(model, train, None, opt, 1, progress=False)  # optimizer has state
    weights = T._copy_state(model)
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    result = T.lr_find(model, train, opt, num_iter=20, progress=False)
    assert len(result.lrs) > 5
    assert same_state(model.state_dict(), weights)
    assert same_optimizer_state(opt.state_dict(), opt_state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_lr_find_gives_a_rising_sweep_and_a_suggestion_inside_it():
    model, opt = setup()
    result = T.lr_find(model, loaders()[0], opt, start_lr=1e-5, end_lr=1.0,
                       num_iter=30, progress=False)
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == 1e-5
    assert len(result.losses) == len(result.lrs) == len(result.raw_losses)
    assert 1e-5 <= result.suggestion <= 1.0
    assert set(result.suggestions) == {"valley", "steepest", "minimum/10"}
    assert "suggestion" in repr(result)


def test_lr_find_stops_when_the_loss_explodes():
    model, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = T.lr_find(model, loaders()[0], opt, start_lr=1e-3,
                       end_lr=1e8, num_iter=100, progress=False)
    assert len(result.lrs) < 100


def test_valley_is_the_middle_of_the_longest_descent():
    lrs = [10.0 ** e for e in range(-6, 3)]
    losses = [2.0, 2.1, 1.9, 1.5, 1.2, 0.9, 0.8, 1.5, 3.0]
    # longest fall: 2.1 -> 0.8 (indices 1 to 6), middle index 3
    assert T._valley(lrs, losses) == lrs[3]
    assert T._steepest(lrs, losses) in (lrs[3], lrs[4])
    assert T._minimum_tenth(lrs, losses) == pytest.approx(lrs[6] / 10)


def test_lr_find_rejects_unknown_methods_and_ranges():
    model, opt = setup()
    with pytest.raises(ValueError, match="unknown method"):
        T.lr_find(model, loaders()[0], opt, method="best")
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        T.lr_find(model, loaders()[0], opt, start_lr=1.0, end_lr=0.1)


# ------------------------------------------------ a real backbone (slow)


@pytest.mark.slow
def test_lite0_trains_with_gradual_unfreezing_and_one_cycle():
    pretrained = models.load_pretrained("efficientnet_lite0", num_classes=3,
                                        image_size=64)
    models.freeze(pretrained)
    plan = T.GradualUnfreezing(["head", "neck", "stage7"], lr=1e-3)
    opt = plan.make_optimizer(pretrained)
    train = data.synthetic_images(classes=3, n_per_class=4, image_size=64,
                                  transform=pretrained.transform)
    loader = DataLoader(train, batch_size=6, shuffle=True)
    sched = lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups],
        total_steps=3 * len(loader))
    h = T.fit(pretrained, loader, loader, opt, 3, scheduler=sched,
              unfreezing=plan, progress=False)
    assert [e["group"] for e in h.events] == ["head", "neck", "stage7"]
    assert models.group_status(pretrained)["stage7"]
    assert not models.group_status(pretrained)["stage6"]
