"""Render every plot of tlhelpers.plots to PNG files in docs/gallery/.

Uses the real efficientnet_lite0 (its ImageNet weights ship with the
course) on synthetic shapes, small enough to finish in under two minutes
on a 2-core CPU, offline. Run from anywhere:

    python scripts/make_gallery.py [--out docs/gallery] [--dpi 90]
"""

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

from tlhelpers import (config, data, features, models, plots, strategies,
                       training)
from tlhelpers.widgets import LivePlot

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
CLASSES = 8            # with ring and hexagon next to circle: not too easy
PER_CLASS = 10         # training pool (three quarters train, rest val)
TEST_PER_CLASS = 8
IMAGE_SIZE = 96
EPOCHS = 4
LABELS_PER_CLASS = [1, 3, 7]  # the learning-curve points


def save(fig, folder, name, dpi, made):
    """Write a figure as PNG atomically (temp file, then rename)."""
    path = folder / f"{name}.png"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.part")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        # mkstemp makes the file private (0600); a gallery image is not.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        plots._pyplot().close(fig)
    made.append(path)
    print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
          f" ({path.stat().st_size // 1024} KB)")


@contextlib.contextmanager
def section(title):
    """Print a section's title, then its wall-clock and CPU seconds."""
    print(title + "...", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    print(f"  [{time.perf_counter() - wall:.1f} s, cpu "
          f"{time.process_time() - cpu:.1f} s]", flush=True)


def main(argv=None):
    """Render the gallery; return the list of written files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery")
    parser.add_argument("--dpi", type=int, default=90)
    # One thread: these batches are too small to gain from more, and on a
    # busy machine idle worker threads spinning cost more than they give.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    device = torch.device("cpu")
    made = []

    def out(fig, name):
        save(fig, args.out, name, args.dpi, made)

    with section("models and data"):
        config.seed_everything(0)
        pre = models.load_pretrained(BACKBONE, num_classes=CLASSES,
                                     image_size=IMAGE_SIZE)
        mean, std = pre.meta["mean"], pre.meta["std"]
        pool = data.synthetic_images(
            "shapes", classes=CLASSES, n_per_class=PER_CLASS,
            image_size=IMAGE_SIZE, seed=0, transform=pre.transform)
        test = data.synthetic_images(
            "shapes", classes=CLASSES, n_per_class=TEST_PER_CLASS,
            image_size=IMAGE_SIZE, seed=1, transform=pre.transform)
        names = list(pool.classes)
        train, val = data.train_val_split(pool, val_fraction=0.25, seed=0)
        augmented = data.with_transform(train, pre.train_transform)
        train_loader, val_loader = data.make_loaders(augmented, val,
                                                     batch_size=16)

    with section("what the network sees"):
        out(plots.plot_filters(pre), "filters")
        imagenet = models.load_pretrained(BACKBONE, image_size=224)
        cat = data.sample_photos()["chelsea"]
        out(plots.plot_feature_maps(imagenet, cat, channels=6),
            "feature_maps")
        del imagenet
        out(plots.show_batch(next(iter(train_loader)), class_names=names,
                             mean=mean, std=std, ncols=8, max_images=16),
            "batch")

    with section("feature spaces"):
        random_net = models.load_pretrained(BACKBONE, num_classes=CLASSES,
                                            weights=None,
                                            image_size=IMAGE_SIZE)
        kw = dict(cache=False, device=device, progress=False)
        spaces = {
            "ImageNet features": features.extract_features(pre, pool, **kw),
            "random-init features": features.extract_features(
                random_net, pool, **kw)}
        del random_net
        out(plots.plot_embeddings(spaces, class_names=names, method="pca"),
            "embeddings_pca")
        out(plots.plot_embeddings(spaces, class_names=names, method="tsne"),
            "embeddings_tsne")

    with section("learning-rate finder"):
        # Every layer trains here, so too high a rate visibly blows up.
        models.unfreeze(pre)
        finder = training.lr_find(pre, train_loader,
                                  models.make_optimizer(pre, lr=1e-3),
                                  start_lr=1e-6, end_lr=10.0, num_iter=40,
                                  device=device, progress=False)
        out(plots.plot_lr_finder(finder), "lr_finder")

    with section("gradual unfreezing"):
        config.seed_everything(0)
        models.freeze(pre)
        schedule = training.GradualUnfreezing(
            ["head", "neck", "stage7", "stage6"], lr=2e-3, factor=2.6)
        history = training.fit(pre, train_loader, val_loader,
                               schedule.make_optimizer(pre), EPOCHS,
                               unfreezing=schedule, device=device,
                               progress=False,
                               live=LivePlot(mode="text", epochs=EPOCHS))
        out(plots.plot_history(history), "history")
        out(plots.plot_unfreezing_timeline(schedule, epochs=EPOCHS,
                                           groups=pre),
            "unfreezing_timeline")

    with section("head only and full fine-tuning"):
        runs = {"gradual unfreezing": history}
        for label, strategy in (("head only", "head_only"),
                                ("full fine-tuning", "full_fine_tuning")):
            config.seed_everything(0)
            net = models.load_pretrained(BACKBONE, num_classes=CLASSES,
                                         image_size=IMAGE_SIZE)
            if strategy == "head_only":
                models.freeze(net)
            runs[label] = training.fit(net, train_loader, val_loader,
                                       models.make_optimizer(net, lr=1e-3),
                                       EPOCHS, device=device,
                                       progress=False)
        out(plots.plot_history(runs), "history_compare")

    with section("predictions"):
        predictions = training.predict(pre, test, device=device)
        out(plots.plot_confusion_matrix(predictions, class_names=names,
                                        normalize="true"),
            "confusion_matrix")
        images = torch.stack([test[i][0] for i in range(len(test))])
        out(plots.show_predictions(images, predictions, class_names=names,
                                   mean=mean, std=std, ncols=6,
                                   max_images=12, mistakes_first=True),
            "predictions")

    with section("strategies and learning curves"):
        table = strategies.compare_strategies(
            pool, test, model=BACKBONE,
            strategies=("from_scratch", "feature_extraction", "head_only",
                        "fine_tuning"),
            epochs=3, lr=1e-3, batch_size=16,
            labels_per_class=LABELS_PER_CLASS, device=device,
            progress=False)
        print(table)
        out(plots.plot_strategy_comparison(table, chance=1 / CLASSES),
            "strategy_comparison")
        out(plots.plot_learning_curves(table, chance=1 / CLASSES),
            "learning_curves")
    print(f"{len(made)} figures in {time.perf_counter() - start:.0f} s "
          f"(cpu {time.process_time() - cpu:.0f} s)")
    return made


if __name__ == "__main__":
    main()
