"""Reference images: discovery, seeded subsets, corrupt files, CLIP preprocessing, contrastive pairs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from coerasing.errors import CoErasingError
from coerasing.images import (
    choose_subset,
    clip_image_processor,
    contrastive_embedding,
    list_contrastive_pairs,
    list_image_files,
    load_images,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _png(path, colour=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_listing_ignores_other_files(tmp_path):
    for i in range(3):
        _png(tmp_path / f"x_{i}.png")
    (tmp_path / "metadata.csv").write_text("file,prompt,seed\n")
    assert [p.name for p in list_image_files(tmp_path)] == ["x_0.png", "x_1.png", "x_2.png"]
    assert list_image_files(tmp_path / "x_1.png") == [tmp_path / "x_1.png"]


def test_subset_is_seeded_and_warns_when_too_large(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(10)]
    assert choose_subset(files, 4, seed=1) == choose_subset(files, 4, seed=1)
    assert choose_subset(files, 4, seed=1) != choose_subset(files, 4, seed=2)
    with pytest.warns(UserWarning, match="larger than the 10 images"):
        assert choose_subset(files, 50, seed=0) == files


def test_corrupt_images_are_skipped_with_a_warning(tmp_path):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        kept, images = load_images([good, bad])
    assert kept == [good] and images[0].mode == "RGB"
    with pytest.raises(CoErasingError, match="none of the 1 image"), pytest.warns(UserWarning):
        load_images([bad])


def test_clip_preprocessing_uses_clip_statistics_and_encoder_resolution():
    processor = clip_image_processor(32)
    assert list(processor.image_mean) == pytest.approx(CLIP_MEAN)
    assert list(processor.image_std) == pytest.approx(CLIP_STD)
    image = Image.new("RGB", (80, 50), (255, 255, 255))
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[0, :, 16, 16], expected, atol=1e-3)


def test_contrastive_pairs_and_directions(tmp_path):
    for i in range(2):
        pair = tmp_path / f"pair_{i}"
        pair.mkdir()
        _png(pair / "positive.png")
        _png(pair / "negative.png", (0, 0, 0))
    (tmp_path / "incomplete").mkdir()
    _png(tmp_path / "incomplete" / "positive.png")
    with pytest.warns(UserWarning, match="incomplete"):
        pairs = list_contrastive_pairs(tmp_path)
    assert [p.parent.name for p, _ in pairs] == ["pair_0", "pair_1"]
    p, n = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(contrastive_embedding(p, n, "diff"), torch.tensor([-2.0, -3.0]))
    assert torch.equal(contrastive_embedding(p, n, "l1"), torch.tensor([2.0, 3.0]))
    assert torch.equal(contrastive_embedding(p, n, "l2"), torch.tensor([4.0, 9.0]))


def test_every_pil_mode_becomes_faithful_8_bit_rgb_or_a_clear_error():
    import numpy as np
    from PIL import Image

    from coerasing.errors import CoErasingError
    from coerasing.images import to_rgb

    def rgb(image):
        return np.asarray(to_rgb(image)).astype(int)

    assert rgb(Image.new("L", (2, 2), 77))[0, 0].tolist() == [77, 77, 77]
    assert rgb(Image.new("1", (2, 2), 1))[0, 0].tolist() == [255, 255, 255]
    assert rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0)))[0, 0].tolist() == [255, 255, 255]  # transparent: white
    assert rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255)))[0, 0].tolist() == [10, 20, 30]
    assert rgb(Image.new("LA", (2, 2), (40, 255)))[0, 0].tolist() == [40, 40, 40]
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert rgb(palette)[0, 0].tolist() == [200, 100, 50]
    palette.info["transparency"] = 1
    assert rgb(palette)[0, 0].tolist() == [255, 255, 255]
    sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))  # I;16: scaled, not clipped at 255
    assert sixteen.mode.startswith("I;16") and rgb(sixteen)[0, 0].tolist() == [255, 255, 255]
    half = Image.fromarray(np.full((2, 2), 32896, np.uint16))
    assert rgb(half)[0, 0].tolist() == [128, 128, 128]
    assert rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32)))[0, 0].tolist() == [128, 128, 128]  # F in [0, 1]
    assert rgb(Image.fromarray(np.full((2, 2), 100, np.int32)))[0, 0].tolist() == [100, 100, 100]  # I in [0, 255]
    assert rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert np.abs(rgb(Image.new("YCbCr", (2, 2), (128, 128, 128)))[0, 0] - 128).max() <= 1
    with pytest.raises(CoErasingError, match="no faithful 8-bit"):
        to_rgb(Image.fromarray(np.full((2, 2), -3.0, np.float32)))
