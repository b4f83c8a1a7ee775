import pytest
import torch

from deepres.data.loader import BatchStream, Preprocess, pad_crop_flip, split_train_val


def test_pad_crop_flip_gives_crops_of_the_padded_image_and_flips_some():
    x = torch.rand(64, 3, 6, 5) + 1  # no zeros, so the padding is recognisable
    out = pad_crop_flip(x, torch.Generator().manual_seed(0), pad=4)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for i in range(len(x)):
        crops = [
            (flip, padded[i, :, dy : dy + 6, dx : dx + 5])
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
        ]
        matches = [f for f, c in crops if torch.equal(out[i], c.flip(2) if f else c)]
        assert matches, f"sample {i} is not a crop of its padded image"
        flipped += matches[0]
    assert 16 < flipped < 48


def test_pad_crop_flip_depends_on_the_generator_only():
    x = torch.rand(8, 3, 8, 8)
    a = pad_crop_flip(x, torch.Generator().manual_seed(1))
    b = pad_crop_flip(x, torch.Generator().manual_seed(1))
    c = pad_crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_split_is_fixed_disjoint_and_complete():
    train, val = split_train_val(100, 10)
    again_train, again_val = split_train_val(100, 10)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert val.tolist() != list(range(10))
    with pytest.raises(ValueError, match="val-split"):
        split_train_val(100, 100)


def test_preprocess_pixel_mean_and_channel_statistics():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    pixel = Preprocess.fit(images, "pixel")
    expected = images.double().div(255).mean(0)
    assert torch.allclose(pixel.mean.double(), expected, atol=1e-6)
    assert torch.allclose(
        pixel(images).double().mean(0), torch.zeros(3, 4, 4, dtype=torch.float64), atol=1e-5
    )
    channel = Preprocess.fit(images, "channel")
    out = channel(images).double()
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        out.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4
    )
    with pytest.raises(ValueError, match="normalize"):
        Preprocess.fit(images, "zca")


def test_batch_stream_visits_every_image_once_per_epoch_and_is_stateless():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).clone()
    labels = torch.arange(40)
    pre = Preprocess(torch.zeros(1, 4, 4), torch.ones(1, 1, 1))
    stream = BatchStream(images, labels, pre, batch_size=8, seed=3, augment=False)
    assert stream.steps_per_epoch == 5
    epoch0 = torch.cat([stream.batch(i)[1] for i in range(5)])
    epoch1 = torch.cat([stream.batch(i)[1] for i in range(5, 10)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(40))
    assert epoch0.tolist() != epoch1.tolist()
    # Labels travel with their images, and a fresh stream gives the same batch for an iteration.
    x, y = stream.batch(7)
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())
    fresh = BatchStream(images, labels, pre, batch_size=8, seed=3, augment=False)
    assert torch.equal(fresh.batch(7)[1], y)
    with pytest.raises(ValueError, match="batch-size"):
        BatchStream(images, labels, pre, batch_size=64, seed=0)


def test_batch_stream_augments_every_training_batch():
    # The paper's pad-4 crop and flip on by default: each sample of a batch is a crop (maybe
    # flipped) of its zero-padded unaugmented self, and the crops differ between samples.
    images = torch.randint(1, 256, (32, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(32)
    pre = Preprocess(torch.zeros(3, 6, 6), torch.ones(3, 1, 1))  # no zeros but the padding
    plain = BatchStream(images, labels, pre, batch_size=16, seed=3, augment=False)
    augmented = BatchStream(images, labels, pre, batch_size=16, seed=3)
    for iteration in (0, 3):
        x, y = plain.batch(iteration)
        out, same_y = augmented.batch(iteration)
        assert torch.equal(same_y, y) and not torch.equal(out, x)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        offsets = set()
        for i in range(len(x)):
            found = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if torch.equal(
                    out[i], padded[i, :, dy : dy + 6, dx : dx + 6].flip(2 if flip else ())
                )
            ]
            assert found, f"sample {i} of iteration {iteration} is not a crop of its padded image"
            offsets.add(found[0])
        assert len(offsets) > 4


@pytest.mark.parametrize("world", [2, 4])
def test_batch_stream_shards_make_up_the_single_process_batch(world):
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(40)
    pre = Preprocess.fit(images)
    whole = BatchStream(images, labels, pre, batch_size=8, seed=3)
    shards = [BatchStream(images, labels, pre, 8, seed=3, shard=(r, world)) for r in range(world)]
    for iteration in (0, 4, 5, 11):  # the same draws across an epoch boundary too
        x, y = whole.batch(iteration)
        parts = [s.batch(iteration) for s in shards]
        assert all(len(p[1]) == 8 // world for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="multiple of 3"):
        BatchStream(images, labels, pre, batch_size=8, seed=0, shard=(0, 3))


def test_pad_crop_flip_draws_every_offset_and_both_flips():
    # Pixels numbered 1..36 (the padding is 0): each crop tells its offset and whether flipped.
    n, size = 4000, 6
    image = (torch.arange(size * size) + 1).float().view(1, 1, size, size)
    out = pad_crop_flip(image.expand(n, 1, size, size).clone(), torch.Generator().manual_seed(0))
    seen = set()
    for crop in out[:, 0]:
        i, j = (int(k) for k in (crop > 0).nonzero()[0])  # at least 2x2 pixels are the image's
        row, col = divmod(int(crop[i, j]) - 1, size)
        flip = bool(crop[i, j + 1] < crop[i, j])
        seen.add((row + 4 - i, col + 4 - (size - 1 - j if flip else j), flip))
    assert seen == {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)}
