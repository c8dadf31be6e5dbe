"""Tests for tlhelpers.data: synthetic domains, real data, folders, downloads.

Everything runs offline on tiny images; the transfer measurement that needs
a real backbone is marked slow.
"""

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tlhelpers import data
from tlhelpers.data import (DOMAINS, SHAPES, TEXTURES, ChecksumError,
                            Download, LabelledImages, LabelledSubset,
                            UnavailableError, UnsafeArchiveError, digits,
                            download, few_shot, image_folder, make_loaders,
                            sample_photos, synthetic_images,
                            train_val_split, verify_sha256, with_transform)

ROOT = Path(__file__).resolve().parents[1]


def digest(dataset):
    h = hashlib.sha256()
    for i in range(len(dataset)):
        h.update(dataset.render(i).tobytes())
    return h.hexdigest()


def pixels(image):
    return np.asarray(image, dtype=np.float32) / 255


# ------------------------------------------------------ synthetic images


def test_at_least_ten_shapes_and_several_textures_are_available():
    assert len(SHAPES) >= 10 and len(set(SHAPES)) == len(SHAPES)
    assert len(TEXTURES) >= 5 and len(set(TEXTURES)) == len(TEXTURES)
    assert {"photo", "sketch", "noisy_gray"} <= set(DOMAINS)


@pytest.mark.parametrize("kind", ["shapes", "textures"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_every_kind_and_domain_draws_rgb_images_of_the_asked_size(
        kind, domain):
    names = SHAPES if kind == "shapes" else TEXTURES
    ds = synthetic_images(kind, classes=list(names), n_per_class=1,
                          image_size=40, domain=domain)
    assert len(ds) == len(names)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.mode == "RGB" and image.size == (40, 40)
        assert target == i
        assert pixels(image).std() > 0.05, f"{names[i]} drew a blank image"


def test_domains_render_in_their_own_style():
    def stats(domain):
        ds = synthetic_images(n_per_class=4, image_size=48, domain=domain)
        arr = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        gray = np.abs(arr - arr[..., :1].astype(int)).max() / 255
        return arr.mean() / 255, gray

    photo_mean, photo_colour = stats("photo")
    sketch_mean, sketch_colour = stats("sketch")
    _, noisy_colour = stats("noisy_gray")
    assert photo_colour > 0.2  # colourful
    assert sketch_colour == 0 and sketch_mean > 0.8  # dark lines on white
    assert noisy_colour == 0  # grayscale


def test_noisy_gray_is_much_noisier_than_silhouette():
    def roughness(domain):
        ds = synthetic_images(n_per_class=2, image_size=48, domain=domain)
        arr = np.stack([pixels(ds[i][0])[..., 0] for i in range(len(ds))])
        return np.abs(np.diff(arr, axis=-1)).mean()

    assert roughness("noisy_gray") > 5 * roughness("silhouette")


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not():
    a = synthetic_images(n_per_class=3, image_size=32, seed=7)
    b = synthetic_images(n_per_class=3, image_size=32, seed=7)
    c = synthetic_images(n_per_class=3, image_size=32, seed=8)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    # reading an item twice, in any order, gives the same picture
    assert a[4][0].tobytes() == a[4][0].tobytes() == b[4][0].tobytes()


@pytest.mark.slow  # a fresh interpreter imports torch: a few seconds
def test_same_seed_gives_identical_tensors_in_a_separate_process():
    code = ("import hashlib, sys\n"
            "from torchvision.transforms import ToTensor\n"
            "from tlhelpers.data import synthetic_images\n"
            "h = hashlib.sha256()\n"
            "for kind, domain in [('shapes', 'photo'), "
            "('textures', 'noisy_gray'), ('shapes', 'sketch')]:\n"
            "    ds = synthetic_images(kind, n_per_class=2, image_size=32,\n"
            "                          domain=domain, seed=3,\n"
            "                          transform=ToTensor())\n"
            "    for i in range(len(ds)):\n"
            "        h.update(ds[i][0].numpy().tobytes())\n"
            "print(h.hexdigest())\n")
    # another hash seed: nothing may depend on Python's salted hash()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    h = hashlib.sha256()
    for kind, domain in [("shapes", "photo"), ("textures", "noisy_gray"),
                         ("shapes", "sketch")]:
        ds = synthetic_images(kind, n_per_class=2, image_size=32,
                              domain=domain, seed=3, transform=T.ToTensor())
        for i in range(len(ds)):
            h.update(ds[i][0].numpy().tobytes())
    assert out.stdout.strip() == h.hexdigest()


def test_an_image_does_not_change_with_dataset_size_or_class_subset():
    small = synthetic_images(classes=["star", "ring"], n_per_class=2,
                             image_size=32)
    large = synthetic_images(classes=["circle", "star", "ring"],
                             n_per_class=5, image_size=32)
    # item 3 of `small` is the second ring; item 5 of `large` is too
    assert small.render(3).tobytes() == large.render(5).tobytes()


def test_classes_are_balanced_and_interleaved():
    ds = synthetic_images(classes=4, n_per_class=6, image_size=24)
    assert len(ds) == 24
    assert np.bincount(ds.targets).tolist() == [6] * 4
    assert ds.targets[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ds.classes == list(SHAPES[:4])


def test_classes_by_name_keep_the_given_order():
    ds = synthetic_images("textures", classes=["dots", "stripes"],
                          n_per_class=1, image_size=24)
    assert ds.classes == ["dots", "stripes"]


def test_unknown_class_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown shape class 'oval'") as e:
        synthetic_images(classes=["circle", "oval"])
    assert "circle, square, triangle" in str(e.value)
    with pytest.raises(ValueError, match="unknown texture class 'circle'"):
        synthetic_images("textures", classes=["circle", "dots"])


@pytest.mark.parametrize("classes, message", [
    (1, "between 2 and 12"), (len(SHAPES) + 1, "between 2 and 12"),
    (["circle"], "at least 2 classes"), (["star", "star"], "twice"),
    ("circle", "list of names"),
])
def test_class_count_limits_give_clear_errors(classes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        synthetic_images(classes=classes)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_per_class": 0}, "n_per_class must be an int >= 1, got 0"),
    ({"n_per_class": 2.5}, "n_per_class must be an int"),
    ({"image_size": 8}, "image_size must be an int from 16"),
    ({"image_size": 64.0}, "image_size must be an int"),
    ({"domain": "cartoon"}, "unknown domain 'cartoon'; choose from: photo"),
    ({"kind": "animals"}, "unknown kind 'animals'"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"noise": 2}, "noise .* must be in \\[0, 1\\]"),
    ({"rotation": 400}, "rotation .* must be in \\[0, 180\\]"),
    ({"scale": (0.9, 0.2)}, "scale must be"),
    ({"backgrounds": "sky"}, "unknown background 'sky'"),
    ({"colours": ["reddish"]}, "unknown colour 'reddish'"),
    ({"colours": []}, "at least one colour"),
    ({"colours": [(1.0, 0.5, 0.0)]}, "tuple of 0-255 integers"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_images(**kwargs)


def test_a_misspelt_control_suggests_the_right_name():
    with pytest.raises(TypeError, match="did you mean 'colours'"):
        synthetic_images(colors=["red"])


def test_one_colour_may_be_given_without_a_list():
    a = synthetic_images(n_per_class=1, image_size=24, colours="orange")
    b = synthetic_images(n_per_class=1, image_size=24,
                         colours=[(255, 165, 0)])
    assert digest(a) == digest(b)


def test_colours_control_paints_the_foreground():
    ds = synthetic_images(classes=["square", "circle"], n_per_class=3,
                          image_size=48, colours=[(255, 0, 0)],
                          backgrounds="solid", noise=0)
    for i in range(len(ds)):
        arr = pixels(ds[i][0])
        red = (arr[..., 0] > 0.55) & (arr[..., 1] < 0.25) & (
            arr[..., 2] < 0.25)
        assert red.mean() > 0.1


def test_noise_control_changes_the_grain():
    def rough(noise):
        ds = synthetic_images(n_per_class=2, image_size=48, noise=noise,
                              backgrounds="solid")
        arr = np.stack([pixels(ds[i][0]) for i in range(len(ds))])
        return np.abs(np.diff(arr, axis=2)).mean()

    assert rough(0.4) > 4 * rough(0.0)


def test_rotation_zero_keeps_squares_upright():
    def fill_of_box(ds):
        fills = []
        for i in range(len(ds)):
            ink = pixels(ds[i][0])[..., 0] < 0.5
            ys, xs = np.nonzero(ink)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fills.append(ink.sum() / box)
        return np.array(fills)

    common = dict(classes=["square", "circle"], n_per_class=6,
                  image_size=64, domain="silhouette")
    upright = fill_of_box(synthetic_images(rotation=0, **common))[0::2]
    turned = fill_of_box(synthetic_images(rotation=180, **common))[0::2]
    assert upright.min() > 0.9
    assert turned.min() < 0.8


def test_scale_control_sets_the_shape_size():
    def ink(scale):
        ds = synthetic_images(classes=["circle", "square"], n_per_class=2,
                              image_size=48, domain="silhouette",
                              scale=scale)
        return np.mean([(pixels(ds[i][0])[..., 0] < 0.5).mean()
                        for i in range(len(ds))])

    assert ink(0.9) > 3 * ink(0.4)


def test_transform_is_applied_to_each_image():
    ds = synthetic_images(n_per_class=1, image_size=32,
                          transform=T.ToTensor())
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)
    assert ds.render(0).size == (32, 32)  # render() skips the transform


def test_dataset_pickles_and_dataloader_workers_draw_the_same_images():
    ds = synthetic_images(n_per_class=2, image_size=24,
                          transform=T.PILToTensor())
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])
    (loader,) = make_loaders(ds, batch_size=5, num_workers=1,
                             shuffle_first=False)
    batch = torch.cat([x for x, _ in loader])
    assert torch.equal(batch, torch.stack([ds[i][0]
                                           for i in range(len(ds))]))


def test_index_out_of_range_raises_index_error():
    ds = synthetic_images(n_per_class=1, image_size=24)
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1][1] == len(ds.classes) - 1


# ------------------------------------------------------ real offline data


def test_digits_are_rgb_images_of_ten_classes():
    ds = digits(image_size=24)
    assert len(ds) == 1797 and ds.classes == [str(d) for d in range(10)]
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (24, 24)
    assert label == 0 and len(ds.targets) == len(ds)
    tensor, _ = digits(transform=T.ToTensor(), image_size=16)[5]
    assert tensor.shape == (3, 16, 16)


def test_sample_photos_are_rgb_and_have_documented_labels():
    photos = sample_photos()
    assert {"chelsea", "coffee", "rocket", "astronaut"} <= set(photos)
    assert set(photos) == set(data.SAMPLE_PHOTOS)
    for image in photos.values():
        assert image.mode == "RGB" and min(image.size) >= 200
    for what, ids in data.SAMPLE_PHOTOS.values():
        assert what and (ids is None or all(0 <= i < 1000 for i in ids))


# ----------------------------------------------- subsets, splits, loaders


def test_few_shot_keeps_k_per_class_reproducibly():
    ds = synthetic_images(classes=3, n_per_class=8, image_size=16)
    sub = few_shot(ds, 2, seed=1)
    assert isinstance(sub, LabelledSubset)
    assert np.bincount(sub.targets).tolist() == [2, 2, 2]
    assert sub.classes == ds.classes
    assert [ds.targets[i] for i in sub.indices] == sub.targets
    assert few_shot(ds, 2, seed=1).indices == sub.indices
    assert few_shot(ds, 2, seed=2).indices != sub.indices
    assert few_shot(few_shot(ds, 4), 1).targets.count(0) == 1


def test_few_shot_rejects_k_larger_than_a_class():
    ds = synthetic_images(classes=2, n_per_class=3, image_size=16)
    with pytest.raises(ValueError, match="'circle' has only 3 .* k=4"):
        few_shot(ds, 4)
    with pytest.raises(ValueError, match="k .* must be an int >= 1"):
        few_shot(ds, 0)


def test_train_val_split_is_stratified_and_disjoint():
    ds = LabelledImages([None] * 50, [0] * 30 + [1] * 20, ["a", "b"])
    train, val = train_val_split(ds, val_fraction=0.2, seed=0)
    assert np.bincount(val.targets).tolist() == [6, 4]
    assert np.bincount(train.targets).tolist() == [24, 16]
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(50))
    again, _ = train_val_split(ds, val_fraction=0.2, seed=0)
    assert again.indices == train.indices


def test_train_val_split_errors_are_clear():
    ds = LabelledImages([None] * 3, [0, 0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="'b' has only 1 example"):
        train_val_split(ds)
    with pytest.raises(ValueError, match="val_fraction must be between"):
        train_val_split(ds, val_fraction=1.0)
    with pytest.raises(TypeError, match="needs a dataset with .targets"):
        train_val_split([(0, 0)])


def test_with_transform_replaces_the_transform_and_keeps_labels():
    ds = synthetic_images(n_per_class=2, image_size=32)
    sub = few_shot(ds, 1)
    tensors = with_transform(sub, T.ToTensor())
    assert isinstance(tensors[0][0], torch.Tensor)
    assert tensors.classes == sub.classes and tensors.targets == sub.targets
    assert isinstance(sub[0][0], Image.Image)  # the original is unchanged
    # a second call replaces the first transform instead of stacking on it
    smaller = with_transform(tensors, T.Compose([T.Resize(8),
                                                 T.ToTensor()]))
    assert smaller[0][0].shape == (3, 8, 8)


def test_with_transform_wraps_datasets_it_cannot_reach_inside():
    class Plain(torch.utils.data.Dataset):
        classes, targets = ["a", "b"], [0, 1]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.new("RGB", (4, 4)), self.targets[i]

    wrapped = with_transform(Plain(), T.ToTensor())
    assert wrapped[1][0].shape == (3, 4, 4) and wrapped.targets == [0, 1]


def test_make_loaders_shuffles_only_the_first_and_pins_only_on_gpu():
    train = synthetic_images(n_per_class=4, image_size=16,
                             transform=T.PILToTensor())
    val = with_transform(few_shot(train, 1), T.PILToTensor())
    loaders = make_loaders(train, val, batch_size=4)
    assert isinstance(loaders, tuple) and len(loaders) == 2
    tl, vl = loaders
    assert tl.num_workers == 0 and vl.num_workers == 0
    assert tl.pin_memory == torch.cuda.is_available()
    assert isinstance(tl.sampler, torch.utils.data.RandomSampler)
    assert isinstance(vl.sampler, torch.utils.data.SequentialSampler)
    first = [y.tolist() for _, y in make_loaders(train, batch_size=4)[0]]
    second = [y.tolist() for _, y in make_loaders(train, batch_size=4)[0]]
    assert first == second  # the shuffle is seeded


def test_make_loaders_explains_pil_images_and_bad_sizes():
    ds = synthetic_images(n_per_class=1, image_size=16)
    with pytest.raises(TypeError, match="with_transform"):
        make_loaders(ds)
    with pytest.raises(ValueError, match="batch_size must be"):
        make_loaders(with_transform(ds, T.ToTensor()), batch_size=0)
    with pytest.raises(ValueError, match="at least one dataset"):
        make_loaders()


# ------------------------------------------------------------ image_folder


def save(path, image, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)
    return path


def jpeg_bytes(size=(32, 32), colour="red"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def two_classes(root):
    for c, colour in (("cats", "red"), ("dogs", "blue")):
        for i in range(2):
            save(root / c / f"{i}.png", Image.new("RGB", (12, 10), colour))
    return root


def test_image_folder_loads_classes_and_targets(tmp_path):
    ds = image_folder(two_classes(tmp_path))
    assert ds.classes == ["cats", "dogs"] and ds.targets == [0, 0, 1, 1]
    image, label = ds[2]
    assert image.mode == "RGB" and label == 1
    assert pickle.loads(pickle.dumps(ds)).targets == ds.targets


def test_image_folder_missing_path_says_where_and_what_to_do(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="image folder not found") \
            as e:
        image_folder(missing)
    assert str(missing) in str(e.value) and "sub-folder" in str(e.value)


def test_image_folder_rejects_a_file(tmp_path):
    f = save(tmp_path / "x.png", Image.new("RGB", (4, 4)))
    with pytest.raises(NotADirectoryError, match="is a file"):
        image_folder(f)


def test_image_folder_empty_folder_is_explained(tmp_path):
    with pytest.raises(ValueError, match="no class folders .* it is empty"):
        image_folder(tmp_path)


def test_image_folder_loose_images_need_class_folders(tmp_path):
    save(tmp_path / "a.jpg", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="holds 1 images but no class"):
        image_folder(tmp_path)


def test_image_folder_single_class_is_rejected(tmp_path):
    save(tmp_path / "cats" / "a.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="only one class folder .*'cats'"):
        image_folder(tmp_path)


def test_image_folder_lists_class_folders_without_images(tmp_path):
    two_classes(tmp_path)
    (tmp_path / "birds").mkdir()
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "nemo.heic").write_bytes(b"x")
    with pytest.raises(ValueError, match="without images") as e:
        image_folder(tmp_path)
    msg = str(e.value)
    assert "'birds' (empty)" in msg and "'fish'" in msg and ".heic" in msg


def test_image_folder_explains_split_folders_are_not_classes(tmp_path):
    two_classes(tmp_path / "train")
    two_classes(tmp_path / "val")
    with pytest.raises(ValueError, match="look like data splits") as e:
        image_folder(tmp_path)
    assert str(tmp_path / "train") in str(e.value)
    assert image_folder(tmp_path / "train").classes == ["cats", "dogs"]


def test_image_folder_turns_phone_photos_upright(tmp_path):
    two_classes(tmp_path)
    sideways = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    save(tmp_path / "cats" / "phone.jpg", sideways, exif=exif)
    ds = image_folder(tmp_path)
    index = [Path(p).name for p, _ in ds.samples].index("phone.jpg")
    assert ds[index][0].size == (10, 30)


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    two_classes(tmp_path)
    save(tmp_path / ".ipynb_checkpoints" / "x.png", Image.new("RGB", (4, 4)))
    (tmp_path / "cats" / "._0.png").write_bytes(b"mac resource fork")
    ds = image_folder(tmp_path)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 4


def test_image_folder_skips_corrupt_files_with_one_warning(tmp_path):
    two_classes(tmp_path)
    (tmp_path / "cats" / "garbage.jpg").write_bytes(b"not an image")
    (tmp_path / "dogs" / "truncated.jpg").write_bytes(
        jpeg_bytes((64, 64))[:300])
    (tmp_path / "dogs" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = image_folder(tmp_path)
    ours = [w for w in caught if "unreadable" in str(w.message)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "skipped 3" in msg
    for name in ("garbage.jpg", "truncated.jpg", "empty.png"):
        assert name in msg
    assert len(ds) == 4
    for i in range(len(ds)):
        assert ds[i][0].mode == "RGB"


def test_image_folder_class_with_only_corrupt_files_is_an_error(tmp_path):
    save(tmp_path / "cats" / "a.png", Image.new("RGB", (4, 4)))
    save(tmp_path / "dogs" / "bad.jpg", Image.new("RGB", (4, 4)))
    (tmp_path / "dogs" / "bad.jpg").write_bytes(b"broken")
    with pytest.raises(ValueError, match="no readable images in class "
                                         "folder 'dogs'.* bad.jpg: cannot"):
        image_folder(tmp_path)


def test_image_folder_converts_every_mode_to_rgb(tmp_path):
    a = tmp_path / "a"
    save(a / "gray.png", Image.new("L", (8, 8), 128))
    save(a / "rgba.png", Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    save(a / "palette.gif", Image.new("P", (8, 8), 3))
    save(a / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 0, 0)))
    deep = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    save(a / "sixteen.png", deep)
    save(tmp_path / "b" / "tiny.png", Image.new("RGB", (1, 1), "green"))
    ds = image_folder(tmp_path)
    assert len(ds) == 6
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
    for name, i in by_name.items():
        assert ds[i][0].mode == "RGB", name
    # fully transparent pixels become white, not black
    assert ds[by_name["rgba.png"]][0].getpixel((0, 0)) == (255, 255, 255)
    assert ds[by_name["sixteen.png"]][0].getpixel((0, 0))[0] > 200


def test_image_folder_very_small_images_go_through_a_transform(tmp_path):
    save(tmp_path / "a" / "one.png", Image.new("RGB", (1, 1), "red"))
    save(tmp_path / "b" / "two.png", Image.new("RGB", (2, 3), "blue"))
    ds = image_folder(tmp_path, transform=T.Compose([T.Resize((16, 16)),
                                                     T.ToTensor()]))
    assert ds[0][0].shape == (3, 16, 16) and ds[1][0].shape == (3, 16, 16)
    assert with_transform(ds, None)[0][0].size == (1, 1)


# --------------------------------------------------------------- downloads


def make_archive(tmp_path, kind="zip"):
    src = tmp_path / "src"
    save(src / "toy" / "a" / "1.png", Image.new("RGB", (4, 4), "red"))
    save(src / "toy" / "b" / "1.png", Image.new("RGB", (4, 4), "blue"))
    if kind == "zip":
        path = tmp_path / "toy.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted((src / "toy").rglob("*.png")):
                zf.write(f, f.relative_to(src).as_posix())
    else:
        path = tmp_path / "toy.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(src / "toy", arcname="toy")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, sha


def entry_for(path, sha, archive="zip", url=None):
    return Download(name="toy", url=url or path.as_uri(), sha256=sha,
                    archive=archive, folder="toy",
                    description="two tiny classes", size_mb=0.0)


def test_verify_sha256_accepts_the_right_digest_and_rejects_others(
        tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert verify_sha256(f, good) == good
    assert verify_sha256(f, good.upper()) == good
    assert verify_sha256(f, good[:8]) == good  # a torch hub prefix
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        verify_sha256(f, "0" * 64)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_verifies_unpacks_and_caches(tmp_path, monkeypatch, kind):
    path, sha = make_archive(tmp_path, kind)
    entry = entry_for(path, sha, archive=kind)
    root = tmp_path / "cache"
    folder = download(entry, root=root, progress=False)
    assert folder == root / "toy" / "toy"
    assert image_folder(folder).classes == ["a", "b"]
    assert not list((root / "toy").glob("*.part"))
    assert not (root / "toy" / path.name).exists()  # archive removed

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached dataset must not be fetched again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_fetch)
    assert download(entry, root=root) == folder


def test_download_uses_the_course_cache_by_default(tmp_path):
    path, sha = make_archive(tmp_path)
    folder = download("toy", registry={"toy": entry_for(path, sha)},
                      progress=False)
    from tlhelpers import config

    assert folder == config.cache_dir("data") / "toy" / "toy"


def test_download_with_a_wrong_checksum_leaves_nothing_behind(tmp_path):
    path, _ = make_archive(tmp_path)
    root = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download(entry_for(path, "0" * 64), root=root, progress=False)
    assert list((root / "toy").iterdir()) == []


def test_download_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TLH_OFFLINE", "1")
    path, sha = make_archive(tmp_path)
    with pytest.raises(UnavailableError, match="TLH_OFFLINE") as e:
        download(entry_for(path, sha), root=tmp_path / "c")
    msg = str(e.value)
    assert "copy it to" in msg and "synthetic_images()" in msg


def test_download_network_failure_is_explained(tmp_path, no_network):
    entry = entry_for(tmp_path / "x.zip", "0" * 64,
                      url="http://example.invalid/x.zip")
    with pytest.raises(UnavailableError, match="download failed"):
        download(entry, root=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c" / "toy").glob("*.part"))


def test_download_accepts_an_archive_copied_in_by_hand(tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("TLH_OFFLINE", "1")
    path, sha = make_archive(tmp_path)
    home = tmp_path / "c" / "toy"
    home.mkdir(parents=True)
    (home / path.name).write_bytes(path.read_bytes())
    folder = download(entry_for(path, sha), root=tmp_path / "c")
    assert (folder / "a" / "1.png").exists()


def test_download_refuses_archives_that_escape_their_folder(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../outside.txt", "x")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UnsafeArchiveError, match="unsafe path"):
        download(entry_for(path, sha), root=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "outside.txt").exists()


def test_download_refuses_a_tar_whose_link_leaves_its_folder(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        link = tarfile.TarInfo("toy/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
        tf.addfile(link)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UnsafeArchiveError, match="unsafe entry"):
        download(entry_for(path, sha, archive="tar.gz"),
                 root=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c" / "toy").glob("toy"))


def test_fetch_checks_the_file_and_leaves_nothing_when_it_is_wrong(
        tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    target = tmp_path / "cache" / "weights-abc.bin"
    target.parent.mkdir()

    def explain(why):
        return f"no weights: {why}"

    with pytest.raises(ChecksumError, match="checksum mismatch"):
        data.fetch(source.as_uri(), target, "0" * 8, explain,
                   progress=False)
    assert list(target.parent.iterdir()) == []
    assert data.fetch(source.as_uri(), target, good[:8], explain,
                      progress=False) == target
    assert target.read_bytes() == b"weights"


def test_fetch_offline_raises_the_callers_explanation(tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv("TLH_OFFLINE", "1")
    with pytest.raises(UnavailableError, match="^no weights: TLH_OFFLINE"):
        data.fetch("http://example.invalid/w.bin", tmp_path / "w.bin",
                   "0" * 8, lambda why: f"no weights: {why}")


@pytest.mark.parametrize("value, kwargs, error, message", [
    (True, {}, ValueError, "n must be an int, got True"),
    (2.0, {}, ValueError, "n must be an int, got 2.0"),
    (0, {"low": 1}, ValueError, "n must be an int >= 1, got 0"),
    (9, {"low": 1, "high": 8}, ValueError, "from 1 to 8, got 9"),
    ("3", {"error": TypeError}, TypeError, "n must be an int, got '3'"),
    (0, {"low": 1, "why": " (images)"}, ValueError, "got 0 \\(images\\)"),
])
def test_check_int_refuses_bools_floats_and_out_of_range_values(
        value, kwargs, error, message):
    with pytest.raises(error, match=message):
        data.check_int(value, "n", **kwargs)


def test_check_int_returns_a_good_value():
    assert data.check_int(3, "n", low=1, high=3) == 3


def test_course_datasets_say_what_their_items_depend_on():
    shapes = synthetic_images(classes=3, n_per_class=2, image_size=32)
    kind, drawn = shapes.fingerprint()
    assert kind[:2] == ["shapes", "photo"] and len(drawn) == 6
    sub = few_shot(shapes, 1)
    assert sub.fingerprint() == [sub.indices, shapes]
    images = LabelledImages([Image.new("RGB", (4, 4))], [0], ["a"])
    assert images.fingerprint() == [[0], images.images]
    plain = torch.utils.data.TensorDataset(torch.zeros(2, 3),
                                           torch.tensor([0, 1]))
    plain.classes, plain.targets = ["a", "b"], [0, 1]
    wrapped = with_transform(plain, str)
    assert wrapped.fingerprint() == [plain]


def test_download_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown dataset 'ants'; choose "
                                         "from: imagenette"):
        download("ants")


def test_registry_entries_are_complete():
    assert data.DOWNLOADS
    for name, entry in data.DOWNLOADS.items():
        assert entry.name == name
        assert len(entry.sha256) == 64
        int(entry.sha256, 16)
        assert entry.archive in ("zip", "tar.gz", "file")
        assert entry.url.startswith(("https://", "http://"))
        assert entry.description and entry.folder


# ------------------------------------------------- the lesson, measured


@pytest.mark.slow
def test_frozen_imagenet_features_beat_training_from_scratch():
    """10 labels per class: a linear probe >= 90 %, from scratch <= 50 %."""
    import importlib.util

    path = ROOT / "benchmarks" / "bench_transfer.py"
    spec = importlib.util.spec_from_file_location("bench_transfer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probe, scratch = bench.near_domain_check()
    assert probe >= 0.9, f"linear probe reached only {probe:.1%}"
    assert scratch <= 0.5, f"from scratch reached {scratch:.1%}"


@pytest.mark.slow
def test_sample_photos_top_class_is_one_of_the_documented_ids():
    from tlhelpers import models

    pre = models.load_pretrained("efficientnet_lite0", image_size=224)
    for name, image in sample_photos().items():
        expected = data.SAMPLE_PHOTOS[name][1]
        if expected is None:
            continue
        best, _ = models.classify(pre, image, k=1)[0]
        assert pre.categories.index(best) in expected, (name, best)


# -------------------------------------------------------- synthetic text


def _words(sentence):
    return set(sentence.lower().replace(",", " ").replace(".", " ")
               .replace("?", " ").split())


def test_synthetic_text_gives_labelled_distinct_sentences_per_topic():
    ds = data.synthetic_text("train", classes=4, n_per_class=30, seed=0)
    assert len(ds) == 120 and ds.classes == list(data.TEXT_CLASSES[:4])
    assert sorted(set(ds.targets)) == [0, 1, 2, 3]
    assert [ds.targets.count(c) for c in range(4)] == [30] * 4
    assert len(set(ds.sentences)) == len(ds)
    sentence, label = ds[0]
    assert isinstance(sentence, str) and isinstance(label, int)
    # Each sentence names two key words of its own topic.
    for sentence, label in zip(ds.sentences, ds.targets):
        own = set(ds.key_words[ds.classes[label]])
        assert len(_words(sentence) & own) == 2, sentence


def test_synthetic_text_is_deterministic_across_processes():
    ds = data.synthetic_text("test", classes=5, n_per_class=10, seed=3)
    again = data.synthetic_text("test", classes=5, n_per_class=10, seed=3)
    other = data.synthetic_text("test", classes=5, n_per_class=10, seed=4)
    assert ds.sentences == again.sentences and ds.targets == again.targets
    assert ds.sentences != other.sentences
    assert ds.fingerprint() == again.fingerprint() != other.fingerprint()
    code = ("from tlhelpers.data import synthetic_text; "
            "print(synthetic_text('test', classes=5, n_per_class=10, "
            "seed=3).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == ds.fingerprint()


def test_the_test_split_uses_key_words_and_templates_never_seen_in_training():
    train = data.synthetic_text("train", classes=6, n_per_class=1080)
    test = data.synthetic_text("test", classes=6, n_per_class=900)
    train_words = set().union(*map(_words, train.sentences))
    test_words = set().union(*map(_words, test.sentences))
    for topic in train.classes:
        unseen = set(test.key_words[topic])
        assert unseen <= test_words
        assert not unseen & train_words, topic
        assert not set(train.key_words[topic]) & test_words, topic
    assert not set(train.templates) & set(test.templates)
    # Whatever the two splits share is the same for every topic.
    shared = train_words & test_words
    keys = {w for ws in list(train.key_words.values())
            + list(test.key_words.values()) for w in ws}
    assert not shared & keys


def test_key_words_of_different_topics_do_not_overlap():
    seen = {}
    for topic, (train, test) in data.TEXT_TOPICS.items():
        for word in train + test:
            assert word not in seen, (word, topic, seen.get(word))
            seen[word] = topic


def test_synthetic_text_explains_bad_arguments():
    with pytest.raises(ValueError, match="split must be"):
        data.synthetic_text("valid")
    with pytest.raises(ValueError, match="Did you mean 'sports'"):
        data.synthetic_text(classes=["sport", "food"])
    with pytest.raises(ValueError, match="between 2 and 6"):
        data.synthetic_text(classes=7)
    with pytest.raises(ValueError, match="n_per_class"):
        data.synthetic_text("test", n_per_class=901)
    with pytest.raises(ValueError, match="at least 2"):
        data.synthetic_text(classes=["food", "food"])


def test_text_subsets_and_transforms_work_like_image_datasets():
    ds = data.synthetic_text("train", classes=4, n_per_class=5)
    sub = few_shot(ds, 2, seed=0)
    assert len(sub) == 8 and sorted(set(sub.targets)) == [0, 1, 2, 3]
    upper = with_transform(ds, str.upper)
    assert upper[0][0] == ds.sentences[0].upper() and ds.transform is None
    with pytest.raises(TypeError, match="tokenizer"):
        make_loaders(ds)
