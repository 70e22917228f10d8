"""lightning_dq.data.arrays: exact box reduction (hand-computed ties, one rounding), batched == single fetch,
servable sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dq.data.arrays import ImageArrayDataset, box_reduce, check_servable, servable_resolutions
from tests.helpers import SHARED_DATA, images

# fixtures are not the official files: their md5 warning is expected (and tested on its own below)
pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")


LOSSLESS20 = SHARED_DATA / "cifar10-lossless20"


JPEG75 = SHARED_DATA / "cifar10-jpeg75"


def test_box_reduce_2x2_hand_computed_with_half_to_even_ties():
    x = np.array(
        [
            [[0, 1, 1, 2, 3, 4, 0, 0, 0, 1], [1, 0, 1, 2, 3, 4, 0, 1, 1, 1]],
        ],
        dtype=np.uint8,
    )  # (C=1, 2, 10): five 2x2 blocks
    # sums 2, 6, 14, 1, 3 -> means 0.5, 1.5, 3.5, 0.25, 0.75 -> ties to even 0, 2, 4; then 0, 1
    np.testing.assert_array_equal(box_reduce(x, 2), [[[0, 2, 4, 0, 1]]])
    top = np.array([[[255, 255], [255, 254]]], dtype=np.uint8)  # mean 254.75 -> 255, no uint8 overflow
    np.testing.assert_array_equal(box_reduce(top, 2), [[[255]]])
    odd_tie = np.array([[[2, 3], [2, 3]]], dtype=np.uint8)  # mean 2.5 -> 2 (even)
    np.testing.assert_array_equal(box_reduce(odd_tie, 2), [[[2]]])


def test_box_reduce_4x4_is_one_rounding_not_two():
    # 2x2 sub-block means 0.5, 0.5, 0.5, 1.5: two rounded 2x2 steps give (0+0+0+2)/4 = 0.5 -> 0, while the
    # 16-pixel mean is 12/16 = 0.75 -> 1. The single 4x4 box is the correctly rounded mean.
    x = np.array([[[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 2], [1, 0, 1, 2]]], dtype=np.uint8)  # (1, 4, 4)
    assert box_reduce(x, 4).item() == 1
    assert box_reduce(box_reduce(x, 2), 2).item() == 0
    batch = images(2, 8, 0)  # (N, 3, 8, 8): leading dims and channels reduce independently
    np.testing.assert_array_equal(box_reduce(batch, 2)[1, 2], box_reduce(batch[1, 2:3], 2)[0])


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_box_reduce_matches_the_definition_on_random_images(factor):
    x = images(2, 16, factor)  # (2, 3, 16, 16)
    r = 16 // factor
    blocks = x.reshape(2, 3, r, factor, r, factor).astype(int)
    # Python's round() is round-half-to-even, and sum / factor^2 is an exact binary fraction
    expected = [
        [[[round(blocks[n, c, i, :, j, :].sum() / factor**2) for j in range(r)] for i in range(r)] for c in range(3)]
        for n in range(2)
    ]
    np.testing.assert_array_equal(box_reduce(x, factor), expected)
    with pytest.raises(ValueError, match=r"factor must be a power of two, got 3"):
        box_reduce(x, 3)


def test_batched_fetch_equals_single_fetch():
    stored = images(6, 16, 4)
    for rows in (None, np.array([5, 0, 3])):
        dataset = ImageArrayDataset(stored, 4, rows)
        picks = [2, 0, 1]
        single = torch.stack([dataset[i] for i in picks])  # (3, 3, 4, 4)
        np.testing.assert_array_equal(torch.stack(dataset.__getitems__(picks)).numpy(), single.numpy())
        kept = picks if rows is None else rows[picks]
        np.testing.assert_array_equal(single.numpy(), box_reduce(stored[kept], 4))


def test_check_resolution_names_the_value_and_the_choices():
    assert servable_resolutions(64) == [64, 32, 16, 8, 4, 2, 1]
    check_servable(64, 16)
    for bad in (48, 128, 0, 33):
        with pytest.raises(ValueError, match=rf"resolution {bad} .*stored at 64x64.*\[64, 32, 16"):
            check_servable(64, bad)


pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official CIFAR-10 files")
