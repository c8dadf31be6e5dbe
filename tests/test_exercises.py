"""Tests of tlhelpers.exercises: every check passes the reference answer,
fails a typical mistake with its message, and reports an untouched
placeholder as not attempted; strict mode raises; notebooks get filled."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from tlhelpers import exercises, models
from tlhelpers.exercises import EXERCISES, Result

COURSE_NOTEBOOKS = ("01_pretrained_models", "02_feature_extraction",
                    "03_fine_tuning", "04_progressive_unfreezing",
                    "05_choosing_a_strategy", "06_capstone",
                    "07_transfer_learning_for_text")


@pytest.fixture(scope="module")
def untrained():
    """An untrained lite0 with a 5-class head: structure without weights."""
    return models.load_pretrained(num_classes=5, weights=None, image_size=64)


def _solve(exercise, **namespace):
    """Run an exercise's reference solution; return its namespace."""
    exec(exercise.solution_code, namespace)
    return namespace


def _placeholder(exercise):
    namespace = {}
    exec(exercise.placeholder, namespace)
    return namespace


def _check(exercise, namespace):
    return exercise.check(*[namespace[a] for a in exercise.args])


def _roundtrip(evidence):
    """Save and load evidence the way the grader does."""
    buffer = io.BytesIO()
    torch.save(evidence, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_incorrect(result, *phrases):
    assert result.status == "incorrect", result
    assert result.points == 0
    for phrase in phrases:
        assert phrase in result.message, result.message


# ------------------------------------------------------------ registry


def test_every_course_exercise_is_registered_in_course_order():
    assert list(EXERCISES) == [
        "load_with_preprocessing", "train_probe", "pick_layer",
        "freeze_backbone", "discriminative_lrs", "fix_the_script",
        "unfreeze_by_hand", "pick_strategy", "capstone", "text_classifier"]
    assert {e.notebook for e in EXERCISES.values()} == set(COURSE_NOTEBOOKS)
    for name, exercise in EXERCISES.items():
        assert getattr(exercises, name) is exercise
        assert exercises.get(name) is exercise


def test_unknown_exercise_names_every_exercise():
    with pytest.raises(ValueError, match="freeze_backbone"):
        exercises.get("freeze_the_backbone")


def test_for_notebook_returns_the_exercises_a_notebook_hosts():
    names = [e.name for e in exercises.for_notebook("03_fine_tuning.ipynb")]
    assert names == ["freeze_backbone", "discriminative_lrs",
                     "fix_the_script"]
    assert exercises.for_notebook("00_welcome") == []


@pytest.mark.parametrize("exercise", EXERCISES.values(), ids=lambda e: e.name)
def test_placeholder_runs_and_leaves_the_answer_not_attempted(exercise):
    namespace = _placeholder(exercise)
    for answer in exercise.answers:
        assert answer in namespace
    values = {a: namespace.get(a, "unused") for a in exercise.args}
    evidence = exercise.collect(values)
    result = exercise.grade(evidence)
    assert result.status == "not attempted", result
    assert result.points == 0 and result.max_points == exercise.points


@pytest.mark.parametrize("exercise", EXERCISES.values(), ids=lambda e: e.name)
def test_exercise_texts_fit_a_notebook(exercise):
    assert exercise.args[:len(exercise.answers)] == exercise.answers
    assert exercise.check_source == (
        f"exercises.{exercise.name}.check({', '.join(exercise.args)})")
    for text in (exercise.placeholder, exercise.solution_code):
        assert all(len(line) <= 79 for line in text.splitlines())
        compile(text, exercise.name, "exec")
    assert exercise.statement and exercise.hint_text and exercise.title


def test_summary_lists_every_exercise_with_its_answer_variables():
    table = exercises.summary()
    assert [r["exercise"] for r in table] == list(EXERCISES)
    assert table[3]["answer"] == "frozen_model"


# --------------------------------------------------------- check itself


def test_check_prints_the_status_and_returns_a_result(capsys):
    result = exercises.pick_strategy.check(...)
    out = capsys.readouterr().out
    assert "pick_strategy: not attempted" in out
    assert isinstance(result, Result) and result.status == "not attempted"


def test_incorrect_check_points_to_hint_and_solution(capsys):
    exercises.pick_strategy.check({"few_near": "from_scratch"})
    out = capsys.readouterr().out
    assert "pick_strategy: incorrect:" in out
    assert "exercises.pick_strategy.hint()" in out


def test_check_with_wrong_arguments_reports_instead_of_raising():
    result = exercises.discriminative_lrs.check(None)
    assert_incorrect(result, "needs pretrained",
                     exercises.discriminative_lrs.check_source)
    result = exercises.freeze_backbone.check(1, 2, 3)
    assert_incorrect(result, "takes 1 argument")
    result = exercises.freeze_backbone.check(model=1)
    assert_incorrect(result, "unexpected argument 'model'")


def test_check_survives_an_answer_that_raises(untrained):
    def broken(image):
        raise RuntimeError("boom")

    result = exercises.load_with_preprocessing.check(broken, untrained)
    assert_incorrect(result, "raised RuntimeError: boom")


def test_check_reports_missing_context_variables():
    evidence = exercises.discriminative_lrs.collect({"optimizer": object()})
    result = exercises.discriminative_lrs.grade(evidence)
    assert_incorrect(result, "`pretrained` is not defined")


def test_strict_mode_raises_on_anything_but_correct(monkeypatch, untrained,
                                                    capsys):
    monkeypatch.setenv("TLH_STRICT", "1")
    with pytest.raises(AssertionError, match="not attempted"):
        exercises.freeze_backbone.check(...)
    with pytest.raises(AssertionError, match="the new head is frozen"):
        frozen = copy.deepcopy(untrained)
        models.freeze_to(frozen, len(frozen.groups))
        exercises.freeze_backbone.check(frozen)
    namespace = _solve(exercises.freeze_backbone, pretrained=untrained)
    assert exercises.freeze_backbone.check(namespace["frozen_model"]).passed


def test_hint_and_solution_print_and_solution_code_is_exposed(capsys):
    exercises.freeze_backbone.hint()
    exercises.freeze_backbone.solution()
    out = capsys.readouterr().out
    assert "requires_grad" in out
    assert exercises.freeze_backbone.solution_code in out


@pytest.mark.parametrize("exercise", [
    e for e in EXERCISES.values() if e.name != "capstone"],
                         ids=lambda e: e.name)
def test_hints_are_graduated_concept_api_then_code_shape(exercise, capsys):
    """hint() is hint(1), the concept; 2 the API; 3 the code's shape;
    each is new, and none is the solution pasted in."""
    levels = exercise.hint_levels()
    assert len(levels) == 3 and len(set(levels)) == 3
    assert exercise.hint_text == levels[0]
    exercise.hint()
    first = capsys.readouterr().out
    exercise.hint(1)
    assert capsys.readouterr().out == first
    assert f"Hint 1/3 ({exercise.name}): {levels[0]}" in first
    assert f"exercises.{exercise.name}.hint(2)" in first
    exercise.hint(3)
    last = capsys.readouterr().out
    assert levels[2] in last and f"{exercise.name}.solution()" in last
    assert exercises.normalise_code(exercise.solution_code) not in (
        exercises.normalise_code(" ".join(levels)))


def test_a_hint_level_that_does_not_exist_is_explained(capsys):
    exercises.train_probe.hint(4)
    exercises.train_probe.hint(0)
    out = capsys.readouterr().out
    assert out.count("use hint(1) to hint(3), got") == 2


def test_feedback_carries_the_first_hint_only():
    from tlhelpers.grading import GradedNotebook, Gradebook

    result = Result("unfreeze_by_hand", "incorrect", "why", 0.0, 1.0)
    row = GradedNotebook("ann", "04_progressive_unfreezing.ipynb", "ok",
                         results={"unfreeze_by_hand": result})
    text = Gradebook(["unfreeze_by_hand"], [row]).feedback()["ann"]
    levels = exercises.unfreeze_by_hand.hint_levels()
    assert f"Hint: {levels[0]}" in text
    assert levels[1] not in text and levels[2] not in text


def test_result_text_and_points():
    result = Result("x", "correct", "well done", 2.0, 2.0)
    assert result.passed and str(result) == "x: correct. well done"
    assert "[2/2 points]" in result.report()
    assert result.as_dict()["points"] == 2.0
    wrong = Result("x", "incorrect", "why", 0.0, 1.0)
    assert str(wrong) == "x: incorrect: why" and not wrong.passed


# ----------------------------------------------- load_with_preprocessing


def test_preprocessing_solution_passes(untrained):
    namespace = _solve(exercises.load_with_preprocessing,
                       pretrained=untrained)
    result = _check(exercises.load_with_preprocessing, namespace)
    assert result.passed, result
    assert "mean (0.5, 0.5, 0.5)" in result.message


def test_preprocessing_with_imagenet_statistics_fails(untrained):
    from torchvision import transforms as T

    wrong = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                       T.Normalize(models.IMAGENET_MEAN,
                                   models.IMAGENET_STD)])
    result = exercises.load_with_preprocessing.check(wrong, untrained)
    assert_incorrect(result, "normalisation does not match",
                     "mean (0.485, 0.456, 0.406)", "read them from")


@pytest.mark.parametrize("mistake, phrase", [
    ("no_normalize", "not normalised"),
    ("wrong_size", "makes 224x224 images"),
    ("train_transform", "preprocess is random"),
    ("flip", "comes out different"),
    ("pil", "returned a PIL image"),
    ("batch", "returns a batch"),
])
def test_preprocessing_mistakes_get_their_reason(untrained, mistake, phrase):
    from torchvision import transforms as T

    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    answers = {
        "no_normalize": T.Compose([T.Resize(64), T.CenterCrop(64),
                                   T.ToTensor()]),
        "wrong_size": T.Compose([T.Resize(224), T.CenterCrop(224),
                                 T.ToTensor(), norm]),
        "train_transform": untrained.train_transform,
        "flip": T.Compose([T.Resize(64), T.CenterCrop(64),
                           T.RandomHorizontalFlip(1.0), T.ToTensor(),
                           norm]),
        "pil": T.Compose([T.Resize(64), T.CenterCrop(64)]),
        "batch": T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(),
                            norm, lambda x: x.unsqueeze(0)]),
    }
    result = exercises.load_with_preprocessing.check(answers[mistake],
                                                     untrained)
    assert_incorrect(result, phrase)


def test_preprocessing_placeholder_is_not_attempted(untrained):
    result = exercises.load_with_preprocessing.check(..., untrained)
    assert result.status == "not attempted"


# ------------------------------------------------------- freeze_backbone


def test_freeze_solution_passes_and_leaves_pretrained_alone(untrained):
    namespace = _solve(exercises.freeze_backbone, pretrained=untrained)
    result = _check(exercises.freeze_backbone, namespace)
    assert result.passed, result
    assert "only the head trains" in result.message
    assert all(p.requires_grad for p in untrained.model.parameters())


def test_freeze_with_the_head_frozen_says_the_optimizer_has_nothing(
        untrained):
    frozen = copy.deepcopy(untrained)
    for p in frozen.model.parameters():
        p.requires_grad = False
    result = exercises.freeze_backbone.check(frozen)
    assert_incorrect(result, "the new head is frozen: the optimizer has "
                             "nothing to train")


def test_freeze_with_trainable_backbone_groups_names_them(untrained):
    partly = copy.deepcopy(untrained)
    models.freeze_to(partly, -3)
    result = exercises.freeze_backbone.check(partly)
    assert_incorrect(result, "stage7 and neck")
    result = exercises.freeze_backbone.check(copy.deepcopy(untrained))
    assert_incorrect(result, "nothing is frozen")


def test_freeze_by_requires_grad_alone_fails_on_batchnorm_drift(untrained):
    """Frozen weights with statistics that follow the batches: incorrect,
    with the drift named and notebook 03's measurement pointed to."""
    drifting = copy.deepcopy(untrained)
    for p in drifting.model.parameters():
        p.requires_grad = False
    for p in models.get_head(drifting).parameters():
        p.requires_grad = True
    result = exercises.freeze_backbone.check(drifting)
    assert_incorrect(result, "BatchNorm statistics of stem", "Notebook 03",
                     "set_bn_stats")
    models.set_bn_stats(drifting, "frozen")
    assert exercises.freeze_backbone.check(drifting).passed
    models.freeze(drifting, bn_stats="train")
    assert_incorrect(exercises.freeze_backbone.check(drifting),
                     "would still update in training")


def test_freeze_drift_fixture_is_graded_incorrect_outside_the_kernel():
    """The saved evidence of a requires_grad-only answer grades as
    incorrect without a model in the grading process."""
    from pathlib import Path

    path = (Path(__file__).parent / "fixtures" / "freeze_backbone"
            / "requires_grad_only.json")
    evidence = json.loads(path.read_text())
    assert evidence["bn_drift"], "the fixture records the drifting layers"
    result = exercises.freeze_backbone.grade(evidence)
    assert_incorrect(result, "would still update in training")


def test_freeze_with_training_batchnorm_says_so(untrained):
    bn = copy.deepcopy(untrained)
    models.freeze(bn, train_bn=True)
    assert_incorrect(exercises.freeze_backbone.check(bn), "BatchNorm")


def test_freeze_of_the_imagenet_head_or_a_bare_module_fails(untrained):
    imagenet_head = models.load_pretrained(weights=None, image_size=64)
    models.freeze(imagenet_head)
    assert_incorrect(exercises.freeze_backbone.check(imagenet_head),
                     "1000 classes")
    assert_incorrect(exercises.freeze_backbone.check(untrained.model),
                     "not its .model")


def test_freeze_placeholder_is_not_attempted():
    assert exercises.freeze_backbone.check(...).status == "not attempted"


# ---------------------------------------------------- discriminative_lrs


def test_discriminative_solution_and_make_optimizer_pass(untrained):
    namespace = _solve(exercises.discriminative_lrs, pretrained=untrained)
    result = _check(exercises.discriminative_lrs, namespace)
    assert result.passed, result
    assert "10x" in result.message
    optimizer = models.make_optimizer(untrained, lr=1e-3, lr_mult=10)
    assert exercises.discriminative_lrs.check(optimizer, untrained).passed


def test_one_learning_rate_for_everything_fails(untrained):
    optimizer = torch.optim.AdamW(untrained.model.parameters(), lr=1e-3)
    result = exercises.discriminative_lrs.check(optimizer, untrained)
    assert_incorrect(result, "every parameter has the same learning rate")


def test_backbone_faster_than_head_names_the_groups(untrained):
    code = exercises.discriminative_lrs.solution_code.replace(
        '"lr": 1e-4', '"lr": 1e-2')
    namespace = {"pretrained": untrained}
    exec(code, namespace)
    result = exercises.discriminative_lrs.check(namespace["optimizer"],
                                                untrained)
    assert_incorrect(result, "as fast as the head", "stem (0.01)")


def test_optimizer_missing_the_backbone_or_the_head_fails(untrained):
    head_only = torch.optim.AdamW(models.get_head(untrained).parameters())
    assert_incorrect(
        exercises.discriminative_lrs.check(head_only, untrained),
        "only the head is in the optimizer")
    head = {id(p) for p in models.get_head(untrained).parameters()}
    backbone = torch.optim.AdamW(
        [p for p in untrained.model.parameters() if id(p) not in head])
    assert_incorrect(
        exercises.discriminative_lrs.check(backbone, untrained),
        "the head is not in the optimizer")
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    assert_incorrect(exercises.discriminative_lrs.check(other, untrained),
                     "do not belong to `pretrained`")


def test_discriminative_placeholder_is_not_attempted(untrained):
    result = exercises.discriminative_lrs.check(..., untrained)
    assert result.status == "not attempted"


# ------------------------------------------------------- fix_the_script

FIX = exercises.fix_the_script
# One bug put back into the reference solution at a time: (what the
# solution says, what the script says instead).
PLANTED = {
    "batchnorm": ('set_bn_stats(model, "frozen")', "pass"),
    "slow head": ('{"params": body, "lr": lr / lr_mult},  # Bug 2: the '
                  "rates\n"
                  '        {"params": head, "lr": lr},            # were '
                  "swapped",
                  '{"params": body, "lr": lr},\n'
                  '        {"params": head, "lr": lr / lr_mult},'),
    "train mode": ("model.model.eval()", "pass"),
}


def _fix_functions(code):
    namespace = {}
    exec(code, namespace)
    return (namespace.get("fixed_train", namespace.get("train_script")),
            namespace.get("fixed_predict", namespace.get("predict_script")))


def _planted(*bugs):
    code = FIX.solution_code
    for bug in bugs:
        fixed, buggy = PLANTED[bug]
        assert fixed in code, bug
        code = code.replace(fixed, buggy)
    return _fix_functions(code)


def _fix_check(functions):
    """The check in two steps, with the evidence saved and loaded."""
    images, labels = FIX.heldout(exercises.CHECK_SEED)
    images = exercises.to_pil(images)
    evidence = _roundtrip(FIX.collect(
        dict(zip(FIX.args, functions)), images))
    return FIX.grade(evidence, (images, labels))


def test_fix_the_script_accepts_the_reference_fix(smoke):
    result = _fix_check(_fix_functions(FIX.solution_code))
    assert result.passed, result
    assert "held-out accuracy" in result.message


def test_fix_the_script_names_the_bugs_of_the_script_as_shipped(smoke):
    # the script trips the first check, the BatchNorm statistics
    assert_incorrect(_fix_check(_fix_functions(FIX.script_code)),
                     "BatchNorm statistics of frozen groups moved",
                     "set_bn_stats")


@pytest.mark.parametrize("bug, phrases", [
    ("batchnorm", ("BatchNorm statistics of frozen groups moved",
                   "stem")),
    ("slow head", ("the new head moved less than", "highest rate")),
    ("train mode", ("runs the network in training mode", "eval()")),
])
def test_fix_the_script_finds_each_planted_bug_alone(smoke, bug, phrases):
    assert_incorrect(_fix_check(_planted(bug)), *phrases)


def test_fix_the_script_measures_the_trained_model_not_the_claim(
        smoke, monkeypatch):
    # a fix that leaves the new head untrained reaches no target
    def train_nothing(model, train_loader, epochs=4):
        for p in model.model.parameters():
            p.requires_grad = False

    _, predict = _fix_functions(FIX.solution_code)
    assert_incorrect(_fix_check((train_nothing, predict)),
                     "the new head did not train")
    # and the accuracy is measured outside, on the rebuilt weights
    monkeypatch.setattr(FIX, "target", (1.01, 1.01))
    assert_incorrect(_fix_check(_fix_functions(FIX.solution_code)),
                     "the target is 101%")


def test_fix_the_script_explains_answers_that_are_not_functions(smoke):
    train, predict = _fix_functions(FIX.solution_code)
    assert_incorrect(FIX.check(train, 3), "`fixed_predict` must be a "
                     "function")

    def one_class(model, images):
        return [0]

    assert_incorrect(_fix_check((train, one_class)),
                     "returned 13 classes for 100 images")
    assert FIX.check(..., predict).status == "not attempted"


def test_weights_that_do_not_fit_are_the_answer_at_fault():
    """fix_the_script and capstone rebuild the learner's model from its
    weights; weights of another architecture get each check's message."""
    net = models.load_pretrained("efficientnet_lite0", num_classes=5,
                                 weights=None, image_size=64).model
    state = exercises._weights(net)
    assert all(not v.requires_grad for v in state.values())
    state["conv_stem.weight"].zero_()
    assert net.conv_stem.weight.abs().sum() > 0   # a copy, not the net's
    rebuilt = exercises._rebuilt("efficientnet_lite0", 5, 64, state, "no")
    assert torch.equal(rebuilt.model.conv_stem.weight,
                       state["conv_stem.weight"])
    del state["classifier.bias"]
    with pytest.raises(exercises._Incorrect,
                       match=r"^changed the layers \(.*classifier\.bias"):
        exercises._rebuilt("efficientnet_lite0", 5, 64, state,
                           "changed the layers")
    evidence = {"model": "efficientnet_lite0", "image_size": 64,
                "state": state}
    with pytest.raises(exercises._Incorrect, match="final_model's weights "
                       "do not fit a efficientnet_lite0 with a 5-class"):
        exercises.capstone._rebuild(evidence, 5)


def test_notebook_03_shows_the_script_the_check_knows():
    nb = json.loads((Path(__file__).parents[1] / "notebooks"
                     / "03_fine_tuning.ipynb").read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in nb["cells"]]
    assert FIX.script_code.strip() in [s.strip() for s in sources]


# ------------------------------------------------------ unfreeze_by_hand


def _by_hand(schedule=None, head_lr=1e-3, factor=2.6, whole=True,
             twins_same=True):
    """An unfreeze_for_epoch with a chosen mistake.

    schedule(epoch) -> how many groups from the head train.
    """
    def unfreeze_for_epoch(model, optimizer, epoch):
        top_down = model.groups[::-1]
        count = epoch if schedule is None else schedule(epoch)
        training = top_down[:count]
        for name, modules in models.layer_groups(model).items():
            params = [p for m in modules for p in m.parameters()]
            for i, param in enumerate(params):
                param.requires_grad = name in training and (
                    whole or i % 2 == 0)
        for group in optimizer.param_groups:
            name, _, twin = group["name"].partition("+")
            lr = head_lr / factor ** top_down.index(name)
            group["lr"] = lr if twins_same or not twin else lr * 2
    return unfreeze_for_epoch


def test_unfreeze_by_hand_solution_passes(untrained):
    namespace = _solve(exercises.unfreeze_by_hand, pretrained=untrained)
    result = _check(exercises.unfreeze_by_hand, namespace)
    assert result.passed, result
    assert "head 0.001 -> neck 0.00038 -> stage7 0.00015" in result.message


def test_unfreeze_by_hand_leaves_the_learners_model_alone(untrained):
    before = [p.requires_grad for p in untrained.model.parameters()]
    exercises.unfreeze_by_hand.check(_by_hand(), untrained)
    assert [p.requires_grad for p in untrained.model.parameters()] == before


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(schedule=lambda e: e + 1), "in epoch 1 neck trains with the "
                                     "head"),
    (dict(schedule=lambda e: 1 if e < 3 else e), "in epoch 2 neck is "
                                                 "still frozen"),
    (dict(schedule=lambda e: 2 * e - 1), "in epoch 2 stage7 already "
                                         "trains: only head and neck"),
    (dict(factor=1.0), "not slower than head above it"),
    (dict(factor=0.5), "not slower than head above it"),
    (dict(head_lr=1e-2), "the head trains at 0.01: keep it at 0.001"),
    (dict(whole=False), "part of a group trains"),
    (dict(twins_same=False), "have different rates"),
])
def test_unfreeze_by_hand_mistakes_get_their_reason(untrained, kwargs,
                                                    phrase):
    result = exercises.unfreeze_by_hand.check(_by_hand(**kwargs), untrained)
    assert_incorrect(result, phrase)


def test_unfreeze_by_hand_rates_that_move_between_epochs_fail(untrained):
    def drifting(model, optimizer, epoch):
        _by_hand()(model, optimizer, epoch)
        for group in optimizer.param_groups:
            if not group["name"].startswith("head"):
                group["lr"] /= epoch
    result = exercises.unfreeze_by_hand.check(drifting, untrained)
    assert_incorrect(result, "changed since the epoch before")


def test_unfreeze_by_hand_placeholder_and_non_functions(untrained):
    namespace = _placeholder(exercises.unfreeze_by_hand)
    result = exercises.unfreeze_by_hand.check(
        namespace["unfreeze_for_epoch"], untrained)
    assert result.status == "not attempted"
    assert "still the placeholder" in result.message

    def does_nothing_useful(model, optimizer, epoch):
        return model
    result = exercises.unfreeze_by_hand.check(does_nothing_useful,
                                              untrained)
    assert result.status == "not attempted"
    assert "changes nothing yet" in result.message
    result = exercises.unfreeze_by_hand.check({"head": 1}, untrained)
    assert_incorrect(result, "must be a function")
    result = exercises.unfreeze_by_hand.check(..., untrained)
    assert result.status == "not attempted"


# ------------------------------------------------------------ pick_layer

LITE0_BELOW_HEAD = ["stem", "stage1", "stage2", "stage3", "stage4",
                    "stage5", "stage6", "stage7", "neck"]
# What the grader "measures" in the judging tests below: best in the
# middle, the last layer well below it.
GRADER_DEPTHS = dict(zip(LITE0_BELOW_HEAD, [0.3, 0.4, 0.5, 0.7, 0.85,
                                            0.9, 0.88, 0.8, 0.6]))


@pytest.fixture
def grader_depths(monkeypatch):
    monkeypatch.setattr(exercises.pick_layer, "measure",
                        lambda images, labels: dict(GRADER_DEPTHS))


def _pick(best_layer, layer_accuracy):
    exercise = exercises.pick_layer
    evidence = _roundtrip(exercise.collect(
        {"best_layer": best_layer, "layer_accuracy": layer_accuracy}))
    return exercise.grade(evidence, ("images", "labels"))


def test_pick_layer_accepts_a_pick_near_the_graders_best(grader_depths):
    own = dict(GRADER_DEPTHS, stage6=0.93)
    result = _pick("stage6", own)
    assert result.passed, result
    assert "a probe after stage6 reaches 88%" in result.message
    assert "the best layer there, stage5, 90%" in result.message


@pytest.mark.parametrize("pick, own, phrase", [
    ("neck", dict(GRADER_DEPTHS, neck=0.95), "specialised in ImageNet"),
    ("stage2", dict(GRADER_DEPTHS, stage2=0.95), "more than 10% below"),
    ("neck", dict(GRADER_DEPTHS), "your own measurements put stage5 (90%) "
                                  "well ahead of your pick neck (60%)"),
    ("head", dict(GRADER_DEPTHS), "choose one of the groups you measured"),
    ("stage5", {"stage5": 0.9, "neck": 0.6}, "no measurement for stem, "
                                             "stage1, stage2, stage3 and "
                                             "3 more"),
    ("stage5", dict(GRADER_DEPTHS, head=0.5), "not a group below the head"),
    ("stage5", dict(GRADER_DEPTHS, stage5=90), "not between 0 and 1"),
    ("stage5", dict(GRADER_DEPTHS, stage5="high"), "a number from 0 to 1"),
])
def test_pick_layer_mistakes_get_their_reason(grader_depths, pick, own,
                                              phrase):
    assert_incorrect(_pick(pick, own), phrase)


def test_pick_layer_placeholder_is_not_attempted():
    namespace = _placeholder(exercises.pick_layer)
    result = exercises.pick_layer.check(namespace["best_layer"],
                                        namespace["layer_accuracy"])
    assert result.status == "not attempted"
    result = exercises.pick_layer.grade(exercises.pick_layer.collect(
        {"best_layer": "stage5", "layer_accuracy": {}}))
    assert result.status == "not attempted" and "empty" in result.message


def test_pick_layer_grader_draws_two_disjoint_sets(smoke):
    images, labels = exercises.pick_layer.heldout(exercises.GRADING_SEED)
    half = len(labels) // 2
    assert len(labels) == 2 * 5 * 15
    assert labels[:half].tolist() == labels[half:].tolist()
    assert not torch.equal(images[:half], images[half:])


@pytest.mark.slow
def test_pick_layer_solution_passes_on_the_graders_own_images(smoke):
    namespace = _solve(exercises.pick_layer)
    result = exercises.pick_layer.grade(
        _roundtrip(exercises.pick_layer.collect(namespace)),
        exercises.pick_layer.heldout(exercises.GRADING_SEED))
    assert result.passed, result
    assert namespace["best_layer"] not in ("stem", "stage1", "stage2")


# --------------------------------------------------------- pick_strategy


def test_pick_strategy_solution_and_spelling_variants_pass():
    namespace = _solve(exercises.pick_strategy)
    assert _check(exercises.pick_strategy, namespace).passed
    loose = {"few_near": "Linear probe", "many_near": "fine-tuning",
             "many_far": "from scratch", "tight_budget": "head only"}
    assert exercises.pick_strategy.check(loose).passed


def test_pick_strategy_explains_each_wrong_choice():
    answers = dict(_solve(exercises.pick_strategy)["strategies"],
                   few_near="full_fine_tuning")
    result = exercises.pick_strategy.check(answers)
    assert_incorrect(result, "1 of 4 scenarios needs another strategy",
                     "few_near: with ten images per class")


@pytest.mark.parametrize("answers, phrase", [
    ({"few_near": "feature_extraction", "many_near": ...,
      "many_far": ..., "tight_budget": ...}, "no strategy yet for"),
    ({"few_near": "magic", "many_near": "last_k", "many_far": "last_k",
      "tight_budget": "head_only"}, "'magic' is not a strategy"),
    ({"tiny": "head_only"}, "unknown scenario"),
    (["feature_extraction"], "must be a dict"),
])
def test_pick_strategy_malformed_answers(answers, phrase):
    assert_incorrect(exercises.pick_strategy.check(answers), phrase)


def test_pick_strategy_untouched_dict_is_not_attempted():
    namespace = _placeholder(exercises.pick_strategy)
    result = exercises.pick_strategy.check(namespace["strategies"])
    assert result.status == "not attempted"


def test_scenarios_table_lists_every_scenario():
    rows = exercises.pick_strategy.scenarios()
    assert [r["scenario"] for r in rows] == list(exercises.SCENARIOS)


# ---------------------------------------- exercises on held-out images


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setenv("TLH_SMOKE", "1")


def test_heldout_images_are_drawn_from_the_task_without_labels(smoke):
    images, labels = exercises.capstone.heldout(exercises.GRADING_SEED)
    task = exercises.capstone.task()
    assert images.dtype == torch.uint8
    assert images.shape[1:] == (task["image_size"], task["image_size"], 3)
    assert labels.tolist() == [i % task["classes"]
                               for i in range(len(labels))]
    again, _ = exercises.capstone.heldout(exercises.GRADING_SEED)
    assert torch.equal(images, again)
    other, _ = exercises.capstone.heldout(exercises.CHECK_SEED)
    assert not torch.equal(images, other)


def _probe_evidence(weight, labels):
    features = torch.nn.functional.one_hot(labels, 5).float()
    return exercises.train_probe._evidence(
        features=features, weight=weight, bias=torch.zeros(5),
        classes=torch.arange(5))


def test_train_probe_applies_the_probe_itself_not_a_reported_number(
        smoke):
    """The judge applies the recorded probe to the recorded features."""
    labels = torch.arange(50) % 5
    good = _probe_evidence(torch.eye(5), labels)
    assert exercises.train_probe.grade(good, (None, labels)).passed
    bad = _probe_evidence(torch.zeros(5, 5), labels)
    result = exercises.train_probe.grade(_roundtrip(bad), (None, labels))
    assert_incorrect(result, "classifies 20% of 50 held-out images",
                     "target 70%")


def test_a_probe_that_is_not_linear_is_refused():
    class Bent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x) ** 2

    with pytest.raises(exercises._Incorrect, match="not a linear"):
        exercises._linear_map(Bent(), torch.randn(10, 4))
    weight, bias, classes = exercises._linear_map(
        torch.nn.Linear(4, 3), torch.randn(10, 4))
    assert weight.shape == (3, 4) and classes.tolist() == [0, 1, 2]


def test_train_probe_needs_a_probe(untrained):
    result = exercises.train_probe.check(0.95, untrained)
    assert_incorrect(result, "must be what linear_probe(...) returns")
    result = exercises.train_probe.check(..., untrained)
    assert result.status == "not attempted"


@pytest.mark.slow
def test_train_probe_solution_passes_and_a_faked_accuracy_does_not(smoke):
    from tlhelpers import data

    pretrained = models.load_pretrained(image_size=96)
    task = exercises.train_probe.task()
    train_ds = data.synthetic_images(**task, n_per_class=8, seed=0,
                                     transform=pretrained.transform)
    test_ds = data.synthetic_images(**task, n_per_class=4, seed=1,
                                    transform=pretrained.transform)
    namespace = _solve(exercises.train_probe, pretrained=pretrained,
                       train_ds=train_ds, test_ds=test_ds)
    assert _check(exercises.train_probe, namespace).passed
    random_net = models.load_pretrained(weights=None, image_size=96)
    cheat = _solve(exercises.train_probe, pretrained=random_net,
                   train_ds=train_ds, test_ds=test_ds)["probe"]
    cheat.accuracy = 1.0  # a reported number is never trusted
    result = exercises.train_probe.check(cheat, random_net)
    assert_incorrect(result, "held-out images")


@pytest.fixture(scope="module")
def imagenet_lite0():
    return models.load_pretrained(num_classes=5, image_size=64)


def _capstone_graded(model, relabel=lambda preds: preds):
    """Grade a model on held-out images labelled relabel(its predictions).

    The judge rebuilds the model from the recorded weights; labels equal
    to the model's own predictions make a 100% model without training.
    """
    images, _ = exercises.capstone.heldout(exercises.CHECK_SEED)
    images = exercises.to_pil(images)
    evidence = _roundtrip(exercises.capstone.collect(
        {"final_model": model}, images))
    preds = exercises._forward_images(images, model.transform,
                                      model.model).argmax(1)
    return exercises.capstone.grade(evidence, (images, relabel(preds)))


def test_capstone_passes_a_fine_tuned_pretrained_model_that_classifies(
        smoke, imagenet_lite0):
    model = copy.deepcopy(imagenet_lite0)
    with torch.no_grad():  # as if stage7 had been fine-tuned
        for p in model.model.blocks[-1].parameters():
            p.add_(0.001)
    result = _capstone_graded(model)
    assert result.passed, result
    assert result.points == 2.0
    assert "100% of 50 held-out images" in result.message


def test_capstone_rejects_feature_extraction_and_random_starts(
        smoke, imagenet_lite0):
    assert_incorrect(_capstone_graded(copy.deepcopy(imagenet_lite0)),
                     "still has exactly its ImageNet weights")
    scratch = models.load_pretrained(num_classes=5, weights=None,
                                     image_size=64)
    assert_incorrect(_capstone_graded(scratch),
                     "did not start from the ImageNet weights")


def test_capstone_measures_accuracy_on_the_heldout_images(
        smoke, imagenet_lite0):
    model = copy.deepcopy(imagenet_lite0)
    with torch.no_grad():
        model.model.conv_head.weight.mul_(1.01)
    result = _capstone_graded(model, lambda preds: (preds + 1) % 5)
    assert_incorrect(result, "classifies 0% of 50", "target 70%")


def test_capstone_is_measured_from_its_weights_not_its_forward(
        smoke, imagenet_lite0):
    """A forward patched on the learner's object does not reach the judge."""
    model = copy.deepcopy(imagenet_lite0)
    with torch.no_grad():
        model.model.conv_head.weight.mul_(1.01)
    images, _ = exercises.capstone.heldout(exercises.CHECK_SEED)
    images = exercises.to_pil(images)
    honest = exercises._forward_images(images, model.transform,
                                       model.model).argmax(1)
    model.model.forward = lambda x: torch.zeros(len(x), 5)
    evidence = _roundtrip(exercises.capstone.collect(
        {"final_model": model}, images))
    result = exercises.capstone.grade(evidence, (images, honest))
    assert result.passed and "100% of 50" in result.message


def test_capstone_needs_a_new_head_and_an_answer(smoke):
    imagenet = models.load_pretrained(weights=None, image_size=64)
    assert_incorrect(exercises.capstone.check(imagenet), "predicts 1000 "
                                                         "classes")
    assert exercises.capstone.check(...).status == "not attempted"


@pytest.mark.slow
def test_capstone_solution_reaches_the_target(smoke):
    namespace = _solve(exercises.capstone)
    result = _check(exercises.capstone, namespace)
    assert result.passed, result


# ------------------------------------------------------ evidence on disk


def test_evidence_survives_a_safe_save_and_load(untrained):
    """The grader loads evidence with weights_only=True: plain data only."""
    for exercise, namespace in (
            (exercises.freeze_backbone, _solve(exercises.freeze_backbone,
                                               pretrained=untrained)),
            (exercises.discriminative_lrs, _solve(
                exercises.discriminative_lrs, pretrained=untrained)),
            (exercises.unfreeze_by_hand, _solve(
                exercises.unfreeze_by_hand, pretrained=untrained)),
            (exercises.pick_strategy, _solve(exercises.pick_strategy)),
            (exercises.load_with_preprocessing, _solve(
                exercises.load_with_preprocessing, pretrained=untrained))):
        evidence = exercise.collect(namespace)
        assert exercise.grade(_roundtrip(evidence)).passed, exercise.name


# ------------------------------------------------ text_classifier


@pytest.fixture(scope="module")
def text_task_model():
    """minilm_l6 with a 4-class head whose weights are the shipped ones."""
    return models.load_pretrained("minilm_l6", num_classes=4)


def _text_judge(model, seed=exercises.CHECK_SEED):
    """Collect, save and load like the grader, then judge (no kernel)."""
    exercise = exercises.text_classifier
    evidence = _roundtrip(exercise.collect({"topic_model": model}))
    return exercise.grade(evidence, exercise.heldout(seed))


def test_text_heldout_sentences_use_only_words_unseen_in_training(smoke):
    from tlhelpers import data

    sentences, labels = exercises.text_classifier.heldout(
        exercises.GRADING_SEED)
    assert all(isinstance(s, str) for s in sentences)
    assert len(sentences) == len(labels) == 40
    again, _ = exercises.text_classifier.heldout(exercises.GRADING_SEED)
    other, _ = exercises.text_classifier.heldout(exercises.CHECK_SEED)
    assert sentences == again and sentences != other
    train = data.synthetic_text("train",
                                **exercises.text_classifier.task())
    seen = {w for ws in train.key_words.values() for w in ws}
    assert not any(w in s.lower().split() for s in sentences for w in seen)
    # Sentences pass through the grader's image conversion unchanged.
    assert exercises.to_pil(_roundtrip(sentences)) == sentences


@pytest.mark.slow
def test_text_classifier_solution_passes_from_saved_evidence(smoke):
    namespace = _solve(exercises.text_classifier)
    evidence = exercises.text_classifier.collect(namespace)
    # A frozen encoder: only the new head travels to the grader.
    assert sorted(evidence["changed"]) == ["head.bias", "head.weight"]
    result = exercises.text_classifier.grade(
        _roundtrip(evidence),
        exercises.text_classifier.heldout(exercises.GRADING_SEED))
    assert result.passed, result


def test_text_classifier_with_an_untrained_head_fails_on_accuracy(
        smoke, text_task_model):
    result = _text_judge(text_task_model)
    assert_incorrect(result, "held-out sentences", "target 70%")


def test_text_classifier_refuses_an_image_model_with_the_fix(untrained):
    result = _text_judge(untrained)
    assert_incorrect(result, "image model", "load_pretrained('minilm_l6'")


def test_text_classifier_needs_a_head_for_the_task(smoke):
    wrong = models.load_pretrained("minilm_l6", num_classes=3,
                                   weights=None)
    assert_incorrect(_text_judge(wrong), "3 classes", "task has 4")


def test_text_classifier_placeholder_is_not_attempted():
    result = exercises.text_classifier.check(...)
    assert result.status == "not attempted"


# ---------------------------------------------------- notebook cells


def _cell(source, tags=()):
    return {"cell_type": "code", "metadata": {"tags": list(tags)},
            "source": source, "outputs": [], "execution_count": None}


def _course_notebook(check=None):
    ex = exercises.freeze_backbone
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        _cell("x = 1"),
        _cell(ex.placeholder, ["exercise:freeze_backbone"]),
        _cell(check if check is not None else
              f"# check your answer\n{ex.check_source}\n"
              "# exercises.freeze_backbone.hint()",
              ["check:freeze_backbone"])]}


def test_exercise_cells_finds_answer_and_check_cells_by_tag():
    cells = exercises.exercise_cells(_course_notebook())
    assert cells == {"freeze_backbone": {"exercise": [1], "check": [2]}}


def test_normalise_code_ignores_comments_spaces_and_semicolons():
    assert (exercises.normalise_code("# hi\nf( a, b );  # note\n\n")
            == "f(a,b)")


def test_fill_solutions_replaces_only_answer_cells(tmp_path):
    source = tmp_path / "03_fine_tuning.ipynb"
    source.write_text(json.dumps(_course_notebook()))
    out = exercises.fill_solutions(source, tmp_path / "out" / "filled.ipynb")
    nb = json.loads(out.read_text())
    texts = ["".join(c["source"]) for c in nb["cells"]]
    assert texts[0] == "x = 1"
    assert texts[1] == exercises.freeze_backbone.solution_code
    assert "check(frozen_model)" in texts[2]
    assert json.loads(source.read_text()) == _course_notebook()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["filled.ipynb"]


@pytest.mark.parametrize("check, phrase", [
    ("print('correct')", "the check cell must run"),
])
def test_fill_solutions_refuses_a_notebook_that_breaks_the_convention(
        tmp_path, check, phrase):
    source = tmp_path / "nb.ipynb"
    source.write_text(json.dumps(_course_notebook(check)))
    with pytest.raises(ValueError, match=phrase):
        exercises.fill_solutions(source, tmp_path / "out.ipynb")
    assert not (tmp_path / "out.ipynb").exists()


def test_convention_problems_name_unknown_and_missing_cells():
    nb = _course_notebook()
    nb["cells"].pop()
    nb["cells"].append(_cell("pass", ["exercise:freeze_the_head"]))
    problems = exercises.check_cell_problems(nb)
    assert any("0 cells tagged check:freeze_backbone" in p
               for p in problems)
    assert any("unknown exercise 'freeze_the_head'" in p for p in problems)


def test_capstone_partial_credit_rises_from_the_floor_to_the_target(smoke):
    capstone = exercises.capstone
    floor = exercises.config.by_mode(*capstone.floor)
    target = capstone._target()
    assert capstone.partial_credit(floor) == 0.0
    assert capstone.partial_credit(floor - 0.1) == 0.0
    middle = capstone.partial_credit((floor + target) / 2)
    assert middle == pytest.approx(0.5)
    assert capstone.partial_credit(target) == 1.0


def test_capstone_below_target_earns_partial_points_still_incorrect(
        smoke, imagenet_lite0):
    model = copy.deepcopy(imagenet_lite0)
    with torch.no_grad():
        model.model.conv_head.weight.mul_(1.01)

    def right_on_first(count):
        def relabel(preds):
            wrong = (preds + 1) % 5
            wrong[:count] = preds[:count]
            return wrong
        return relabel

    # 50 held-out images in SMOKE mode: 28 right is 56%, between the
    # floor (40%) and the target (70%).
    result = _capstone_graded(model, right_on_first(28))
    assert result.status == "incorrect"
    fraction = exercises.capstone.partial_credit(0.56)
    assert 0 < fraction < 1
    assert result.points == pytest.approx(2.0 * fraction)
    assert result.max_points == 2.0
    assert "56% of 50" in result.message
    assert "partial credit" in result.message
    # At the floor and below: nothing; the extremes are unchanged.
    assert _capstone_graded(model, right_on_first(20)).points == 0.0
    assert _capstone_graded(model, right_on_first(50)).points == 2.0
