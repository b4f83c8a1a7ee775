import io

import numpy as np
import pytest
import torch
from PIL import Image

from deepres.data import DataError
from deepres.data.augment import (
    Augment,
    Lighting,
    center_view,
    colour_statistics,
    resized_crop,
    rrc_box,
    scale_box,
    view,
)
from deepres.evaluate import center_crop, resize_shorter


def encoded(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def smooth_photo(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2
    ).astype(np.uint8)


def test_scale_augmentation_resizes_the_shorter_side_into_the_range_and_crops_inside():
    augment = Augment(crop=16, sizes=(20, 30))
    rng = np.random.default_rng(0)
    width, height = 60, 40  # landscape: the height is the shorter side
    sides, lefts, rights = set(), [], []
    for _ in range(600):
        left, top, right, bottom = scale_box(width, height, rng, augment)
        # The box spans crop pixels of the resized photo, so its size gives the resize.
        shorter = 16 * height / (bottom - top)
        assert abs(shorter - round(shorter)) < 1e-6
        sides.add(round(shorter))
        # The longer side is scaled alike, to the nearest pixel.
        assert abs(16 * width / (right - left) - width * round(shorter) / height) <= 0.5 + 1e-6
        assert 0 <= left < right <= width + 1e-9 and 0 <= top < bottom <= height + 1e-9
        lefts.append(left)
        rights.append(right)
    assert sides == set(range(20, 31))  # every size in [20, 30], both ends included
    assert min(lefts) == 0 and max(rights) == pytest.approx(width)  # crops reach both edges


def test_a_scale_view_is_the_resized_photo_cropped():
    pixels = smooth_photo(60, 40)
    augment = Augment(crop=16, sizes=(20, 30), draft=False)
    box = scale_box(60, 40, np.random.default_rng(3), augment)
    resized = (round(16 * 60 / (box[2] - box[0])), round(16 * 40 / (box[3] - box[1])))
    left, top = round(box[0] * resized[0] / 60), round(box[1] * resized[1] / 40)
    whole = Image.fromarray(pixels).resize(resized, Image.Resampling.BILINEAR)
    expected = np.asarray(whole.crop((left, top, left + 16, top + 16))).astype(int)
    got = np.asarray(resized_crop(Image.fromarray(pixels), box, 16, draft=False)).astype(int)
    assert got.shape == (16, 16, 3)
    # The same filter at the same positions; only Pillow's fixed-point rounding differs.
    assert np.abs(got - expected).max() <= 2 and np.abs(got - expected).mean() < 0.5


def test_views_have_the_crop_size_and_some_are_mirrored():
    data = encoded(smooth_photo(60, 40))
    augment = Augment(crop=16, sizes=(16, 16))  # the whole height: only x and the flip vary
    views = [view(data, "p.png", augment, np.random.default_rng(seed)) for seed in range(40)]
    assert all(v.shape == (16, 16, 3) and v.dtype == np.uint8 for v in views)
    # The red channel ramps left to right: a mirrored view ramps the other way.
    mirrored = sum(int(v[:, 0, 0].mean()) > int(v[:, -1, 0].mean()) for v in views)
    assert 5 < mirrored < 35
    centre = view(data, "p.png", augment, None)
    assert np.array_equal(centre, view(data, "p.png", augment, None))


@pytest.mark.parametrize(("kind", "draw"), [("scale", scale_box), ("rrc", rrc_box)])
def test_a_training_view_is_the_box_its_augmentation_draws(kind, draw):
    data = encoded(smooth_photo(60, 40))
    augment = Augment(kind, crop=16, sizes=(20, 30), draft=False)
    centre = view(data, "p.png", augment, None)
    differs = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        box = draw(60, 40, rng, augment)
        expected = resized_crop(Image.open(io.BytesIO(data)), box, 16, draft=False)
        if rng.random() < 0.5:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = view(data, "p.png", augment, np.random.default_rng(seed))
        assert np.array_equal(got, np.asarray(expected))
        differs += not np.array_equal(got, centre)
    assert differs >= 6  # random views, not the centre view


def test_random_resized_crop_boxes_keep_area_and_ratio_in_range():
    augment = Augment("rrc", crop=16, sizes=(16, 16))
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(400):
        left, top, right, bottom = rrc_box(60, 40, rng, augment)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 60 and 0 <= top and bottom <= 40
        areas.append(w * h / 2400)
        # Rounding to whole pixels bends the drawn ratio a little on a small photo.
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    assert min(areas) < 0.15 and max(areas) > 0.8
    # A photo no draw fits falls back to its central box at the nearest allowed ratio.
    assert rrc_box(400, 10, rng, augment) == (193, 0, 206, 10)


def test_centre_view_is_the_middle_of_the_resized_photo():
    # 60x40 with the shorter side to 20 is 30x20; its central 16x16 starts at (7, 2).
    photo = smooth_photo(60, 40)
    resized = np.asarray(Image.fromarray(photo).resize((30, 20), Image.Resampling.BILINEAR))
    view_ = np.asarray(center_view(Image.fromarray(photo), 20, 16))
    assert np.array_equal(view_, resized[2:18, 7:23])
    assert Augment(crop=224).center_resize == 256
    assert Augment.scaled(crop=112).sizes == (128, 240)


# The central 32x32 of an 800x600 photo with its shorter side at 36 (48x36), in the photo's
# pixels: from (8, 2) to (40, 34) of the resized one.
CENTRE_BOX = (8 * 800 / 48, 2 * 600 / 36, 40 * 800 / 48, 34 * 600 / 36)


def test_held_out_views_are_the_ones_eval_and_predict_see():
    # A large JPEG, which training views decode in draft mode: the held-out view a run scores
    # is decoded whole, as deepres eval --protocol center and predict see the photo.
    data = encoded(smooth_photo(800, 600), "JPEG", quality=95)
    augment = Augment(crop=32, sizes=(36, 64))
    assert augment.center_resize == 37  # 32 x 256 / 224
    held_out = view(data, "photo.jpg", augment, None)
    x = torch.from_numpy(np.asarray(resize_shorter(Image.open(io.BytesIO(data)), 37)).copy())
    seen = center_crop(x.permute(2, 0, 1), 32).permute(1, 2, 0).numpy()
    assert held_out.shape == (32, 32, 3) and np.array_equal(held_out, seen)
    # What training scored before: the same box (from (8, 2) of the 49x37 photo), drafted.
    box = (8 * 800 / 49, 2 * 600 / 37, 40 * 800 / 49, 34 * 600 / 37)
    drafted = np.asarray(resized_crop(Image.open(io.BytesIO(data)), box, 32))
    assert not np.array_equal(drafted, seen)


def test_draft_mode_decodes_a_large_jpeg_smaller_to_nearly_the_same_view():
    data = encoded(smooth_photo(800, 600), "JPEG", quality=95)
    box = CENTRE_BOX
    drafted = np.asarray(resized_crop(Image.open(io.BytesIO(data)), box, 32, draft=True))
    full = np.asarray(resized_crop(Image.open(io.BytesIO(data)), box, 32, draft=False))
    assert drafted.shape == full.shape == (32, 32, 3)
    difference = np.abs(drafted.astype(int) - full.astype(int))
    assert difference.max() > 0  # decoded at 1/8 scale: not the same pixels ...
    assert difference.mean() < 3  # ... but the same view


def test_augment_rejects_sizes_that_cannot_make_the_crop():
    with pytest.raises(ValueError, match="--scale 100,480"):
        Augment(crop=224, sizes=(100, 480))
    with pytest.raises(ValueError, match="--augment"):
        Augment("cutout")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_image_gives_one_line_naming_the_file(damage):
    data = encoded(smooth_photo(60, 40), "JPEG")
    data = data[: len(data) // 2] if damage == "truncated" else b"not a jpeg at all"
    for rng in (None, np.random.default_rng(0)):
        with pytest.raises(DataError, match="train/ants/bad.jpg: cannot decode image") as error:
            view(data, "train/ants/bad.jpg", Augment(crop=16, sizes=(20, 30)), rng)
        assert "\n" not in str(error.value)


def correlated_images(n: int = 20) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(n, 1, 8, 8, generator=generator) * 200
    colour = torch.rand(n, 3, 8, 8, generator=generator) * torch.tensor([40, 20, 5]).view(3, 1, 1)
    return (base + colour).round().clamp(0, 255).to(torch.uint8)


def test_colour_statistics_and_the_eigen_decomposition_reproduce_the_sample_covariance():
    images = correlated_images()
    mean, covariance = colour_statistics(images, chunk=3)  # chunks sum to the whole
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    assert np.allclose(mean.numpy(), pixels.mean(1))
    assert np.allclose(covariance.numpy(), np.cov(pixels))
    lighting = Lighting.fit(covariance)
    eigval, eigvec = lighting.eigval.double(), lighting.eigvec.double()
    assert torch.allclose(eigvec @ torch.diag(eigval) @ eigvec.T, covariance, atol=1e-6)
    assert torch.allclose(eigvec.T @ eigvec, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert eigval[0] > eigval[1] > eigval[2] > 0


def test_lighting_noise_has_std_01_times_the_eigenvalue_along_each_eigenvector():
    lighting = Lighting.fit(colour_statistics(correlated_images())[1], std=0.1)
    alpha = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0))
    offsets = lighting.offsets(alpha).double()
    along = offsets @ lighting.eigvec.double()  # coordinates in the eigenvector basis
    expected = 0.1 * lighting.eigval.double()
    assert torch.allclose(along.std(0), expected, rtol=0.02)
    assert torch.allclose(
        along.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.01 * expected[0]
    )
    # Independent along different eigenvectors.
    correlation = torch.corrcoef(along.T)
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 0.02
