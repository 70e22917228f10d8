"""lightning_dq.codec: the exact per-channel probabilities (they reproduce the head's NLL), tiles, and lossless
round trips, pixel for pixel, whose size is the model's estimate plus a small overhead; damaged or foreign bytes and
other networks are errors, never wrong pixels."""

from __future__ import annotations

import pytest
import torch

from lightning_dq.codec import compress, decompress
from lightning_dq.codec.coder import tile, untile
from lightning_dq.codec.probabilities import head_channel_probs
from lightning_dq.data.cifar10 import read_cifar10
from lightning_dq.data.images import sample_photo
from lightning_dq.errors import CheckpointError, DataError
from lightning_dq.nn.heads import head_nll
from lightning_dq.nn.prior import CodePrior
from tests.helpers import SHARED_DATA, debug_net, uint8_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def networks():
    """The debug net with data-initialised codebooks, and a prior with random (non-uniform) heads."""
    net = debug_net()
    net.train()(uint8_images(16, 32))
    torch.manual_seed(1)
    prior = CodePrior(net.geometry, dim=32, depth=1, heads=2)
    with torch.no_grad():
        for head in prior.level_heads:
            head.weight.normal_(std=0.1)
    return net.eval(), prior.eval()


@pytest.mark.parametrize("head, channels", [("mix", 30), ("categorical", 768)])
def test_channel_probabilities_sum_to_one_and_give_the_head_nll(head, channels):
    params = 2 * torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    x = uint8_images(2, 4, seed=3)
    probs = [head_channel_probs(head, params, x, c, 3) for c in range(3)]  # (2, 256, 4, 4) each
    assert all(float((p.sum(1) - 1).abs().max()) < 1e-5 for p in probs)
    nats = -sum(p.gather(1, x[:, c : c + 1].long()).log().squeeze(1) for c, p in enumerate(probs))  # (2, 4, 4)
    assert torch.allclose(nats.mean(dim=(1, 2)) / 3, head_nll(head, params, x, 3), rtol=1e-4)
    later = x.clone()
    later[:, 1:] = 0  # channel 0's probabilities do not read the later channels (the decoder does not know them)
    assert torch.equal(head_channel_probs(head, params, later, 0, 3), probs[0])


def test_tiles_pad_by_replication_and_untile_exactly():
    image = uint8_images(1, 70, seed=2)[0, :, :45, :70]  # (3, 45, 70): 2 x 3 tiles of 32
    tiles = tile(image, 32)
    assert tiles.shape == (6, 3, 32, 32)
    assert torch.equal(tiles[5, :, 12, 5], image[:, 44, 69])  # bottom-right: the last pixel, replicated
    assert torch.equal(untile(tiles, 45, 70), image)


def test_round_trip_of_images_of_any_size_with_and_without_a_prior(networks):
    net, prior = networks
    images = [uint8_images(1, 32, seed=5)[0], sample_photo("coffee")[:, :50, :81].copy()]
    images = [torch.as_tensor(image) for image in images]
    for p in (prior, None):
        result = compress(images, net, p, names=["noise", "coffee"], group=4)
        decoded, names = decompress(result.data, net, p)
        assert names == ["noise", "coffee"] and all(torch.equal(a, b) for a, b in zip(images, decoded, strict=True))
        assert result.dims == 3 * (32 * 32 + 50 * 81)


def test_coded_size_is_the_estimate_of_the_model(networks):
    """The stream holds what the probabilities say (up to the coder's fixed-point tables), plus a fixed header."""
    net, prior = networks
    images = [uint8_images(1, 32, seed=s)[0] for s in range(8)]
    for p in (prior, None):
        result = compress(images, net, p)
        assert abs(result.payload_bits - result.estimated_bits) < 0.005 * result.estimated_bits
        assert 8 * len(result.data) - result.payload_bits < 8 * 1000  # header and checksum


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-lossless20").is_dir(), reason="../shared/data is not on this machine")
def test_the_twenty_lossless_cifar10_test_images_round_trip(networks):
    net, prior = networks
    images = read_cifar10(SHARED_DATA / "cifar10-lossless20" / "cifar-10-batches-py", ["test_batch"], {})
    images = [torch.from_numpy(image.copy()) for image in images]
    decoded, _ = decompress(compress(images, net, prior, group=8).data, net, prior)
    assert len(decoded) == 20 and all(torch.equal(a, b) for a, b in zip(images, decoded, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "immunohistochemistry", "motorcycle_left"])
def test_the_photographs_at_their_own_sizes_round_trip(networks, name):
    net, prior = networks
    image = torch.from_numpy(sample_photo(name).copy())
    decoded, _ = decompress(compress([image], net, prior).data, net, prior)
    assert torch.equal(decoded[0], image)


def test_damaged_foreign_or_other_networks_bytes_are_errors(networks):
    net, prior = networks
    data = compress([uint8_images(1, 32)[0]], net, prior).data
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    for bad, match in ((bytes(flipped), "damaged"), (data[:-10], "truncated"), (b"PNG" + data[3:], "not a lightning")):
        with pytest.raises(DataError, match=match):
            decompress(bad, net, prior, "x.ldq")
    other = CodePrior(net.geometry, dim=32, depth=1, heads=2)
    with pytest.raises(CheckpointError, match="x.ldq was written with other networks"):
        decompress(data, net, other, "x.ldq")
    with pytest.raises(CheckpointError, match="other networks"):
        decompress(data, net, None, "x.ldq")  # a file with a prior, read without one
    with pytest.raises(DataError, match="expected a uint8 RGB image"):
        compress([torch.zeros(1, 32, 32, dtype=torch.uint8)], net, prior)


def test_a_geometry_without_a_fitting_tile_side_is_refused(networks):
    net, _ = networks
    with pytest.raises(ValueError, match="not a multiple of 16"):
        compress([uint8_images(1, 32)[0]], net, None, resolution=24)
