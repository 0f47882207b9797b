"""The ADE20K loader on a miniature ADEChallengeData2016 tree, and the recipe's transforms."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from subquad.tasks.cli import main
from subquad.tasks.train.data.ade20k import ADE20K, IGNORE_INDEX
from subquad.tasks.train.data.seg_transforms import SegEvalTransform, SegTrainTransform, rescale_size
from subquad.tasks.train.data.synthetic import SHAPES, render, write_classification


def write_pair(root, split, stem, labels, image=None):
    """An RGB .jpg and its 8-bit .png annotation in the real layout."""
    labels = np.asarray(labels, dtype=np.uint8)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((*labels.shape, 3), 128, np.uint8)
    Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
    Image.fromarray(labels).save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_pair(root, "training", "ADE_train_00000001", [[0, 1, 2], [150, 149, 0]])
    write_pair(root, "training", "ADE_train_00000002", np.full((4, 5), 7))
    write_pair(root, "validation", "ADE_val_00000001", [[3, 0], [0, 150]])
    rows = [f"{i}\t0.01\t1\t1\tname{i}, synonym" for i in range(1, 151)]
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows) + "\n")
    return root


def test_reads_the_real_layout_and_maps_labels_as_reduce_zero_label(tree):
    train = ADE20K(tree, "training")
    assert len(train) == 2 and train.class_names[:2] == ["name1", "name2"] and len(train.class_names) == 150
    image, labels = train[0]
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert labels.tolist() == [[IGNORE_INDEX, 0, 1], [149, 148, IGNORE_INDEX]]    # 0 -> 255, k -> k - 1
    assert ADE20K(tree, "training")[1][1].tolist() == [[6] * 5] * 4
    assert ADE20K(tree, "validation")[0][1].tolist() == [[2, IGNORE_INDEX], [IGNORE_INDEX, 149]]


def test_the_synthetic_set_is_written_in_the_real_layouts(tmp_path):
    assert main(["data", "synthetic", "--out", str(tmp_path)]) == 0
    train = ADE20K(tmp_path / "synthetic_ade" / "ADEChallengeData2016", "training", num_classes=7)
    assert len(train) == 400 and train.class_names == ["background", "circle", "square", "triangle", "cross",
                                                        "ring", "diamond"]
    labels = np.concatenate([train[i][1].ravel() for i in range(20)])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 6, IGNORE_INDEX}
    assert sorted(p.name for p in (tmp_path / "synthetic_cls" / "val").iterdir()) == sorted(train.class_names[1:])


def test_bad_trees_are_refused_when_the_data_set_is_built(tree):
    write_pair(tree, "validation", "ADE_val_00000002", [[151, 3]])
    with pytest.raises(ValueError, match=r"ADE_val_00000002.png has label 151, above the 150 classes"):
        ADE20K(tree, "validation")
    with pytest.raises(ValueError, match=r"ADE_train_00000001.png has label 150, above the 5 classes"):
        ADE20K(tree, "training", num_classes=5)
    (tree / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(ValueError, match=r"ADE_train_00000002.jpg has no annotation"):
        ADE20K(tree, "training")
    write_pair(tree, "training", "ADE_train_00000002", [[1, 2]], image=np.zeros((3, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"ADE_train_00000002.png is 2x1 but its image is 2x3"):
        ADE20K(tree, "training")
    with pytest.raises(ValueError, match=r"data folder .*absent/images/training not found"):
        ADE20K(tree.parent / "absent", "training")


def test_train_transform_resizes_crops_flips_and_pads_to_the_crop_size():
    labels = np.zeros((40, 60), np.uint8)
    labels[:, 30:] = 1
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    transform = SegTrainTransform(crop_size=32, scale=(120, 40), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                                  hflip=0.5, photometric=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    random.seed(0)
    for _ in range(20):
        x, y = transform(image, labels)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= {0, 1, IGNORE_INDEX}
        padded = (y == IGNORE_INDEX)
        assert torch.all(x[:, padded] == 0)               # padding: 0 in the normalised image, 255 in the labels
    small = SegTrainTransform(crop_size=32, scale=(20, 10), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, hflip=0,
                              photometric=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = small(image, labels)                           # resized to 10x15, so padded to 32x32
    assert (y[:10, :15] != IGNORE_INDEX).all() and (y[10:] == IGNORE_INDEX).all() and (y[:, 15:] == IGNORE_INDEX).all()


def test_eval_transform_fits_the_image_into_the_scale_and_keeps_full_size_labels():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)           # the long side binds
    image, labels = np.zeros((30, 40, 3), np.uint8), np.ones((30, 40), np.uint8)
    x, y = SegEvalTransform((128, 64), mean=(0.0,) * 3, std=(1.0,) * 3)(image, labels)
    assert x.shape == (3, 64, 85) and y.shape == (30, 40)


def test_the_simple_style_is_one_colour_behind_an_upright_shape(tmp_path):
    rng = np.random.default_rng(0)
    empty, _ = render(rng, 16, 16, [], "simple")
    assert empty.reshape(-1, 3).std(0).max() < 0.05 * 255                 # one colour and the sensor noise
    textured, _ = render(rng, 16, 16, [], "textured")
    assert textured.reshape(-1, 3).std(0).max() > 0.05 * 255
    _, labels = render(np.random.default_rng(1), 32, 32, [SHAPES.index("square")], "simple")
    rows, cols = np.nonzero(labels == 2 + SHAPES.index("square"))
    assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)           # upright: it fills its bounding box
    root = write_classification(tmp_path / "simple", train_per_class=2, val_per_class=1, size=16, style="simple")
    assert len(list((root / "train").rglob("*.png"))) == 12
    with pytest.raises(ValueError, match="style must be one of textured, simple"):
        write_classification(tmp_path / "other", style="stripes")
