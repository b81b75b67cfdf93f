"""plots.save_grid: the layout's size with and without labels, labels drawn under their tiles, unlabelled
grids exactly as torchvision's save_image, shortening of long labels, and errors for labels that do not
fit the images. No model needed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import save_image

import plots

PAD = plots.GRID_PAD


def images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)  # (H, W, 3)


def test_unlabelled_grid_is_torchvisions(tmp_path):
    x = images(5)  # 2 rows of 3, the last one short
    plots.save_grid(x, str(tmp_path / "grid.png"), nrow=3)
    save_image(F.interpolate(x, scale_factor=4, mode="nearest"), tmp_path / "tv.png", nrow=3, padding=2, pad_value=1.0)
    assert Image.open(tmp_path / "grid.png").size == (3 * (128 + PAD) + PAD, 2 * (128 + PAD) + PAD)
    assert np.array_equal(pixels(tmp_path / "grid.png"), pixels(tmp_path / "tv.png"))
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, renamed


@pytest.mark.parametrize("size", [32, 512])  # 32 px images are upscaled to 128 px tiles; 512 px ones are not
def test_labelled_grid_has_the_layouts_size_and_text_under_each_tile(tmp_path, size):
    x = images(4, size)
    tile = max(size, 128)
    font, line_h = plots.grid_font(tile)
    labels = plots.grid_labels(["a red circle", "a blue square", "a cat", "an owl"], torch.tensor([-1.234, 0.5, 2, 3]))
    assert labels[0] == "a red circle\nr=-1.23"
    path = str(tmp_path / "grid.png")
    plots.save_grid(x, path, nrow=2, labels=labels)
    band = PAD + 2 * line_h  # two lines under each tile
    assert Image.open(path).size == (2 * (tile + PAD) + PAD, 2 * (tile + band + PAD) + PAD)

    # every label band holds dark text; the same bands of an unlabelled grid are the white background
    p = pixels(path)
    for row in range(2):
        for col in range(2):
            y, x0 = PAD + row * (tile + band + PAD) + tile, PAD + col * (tile + PAD)
            under = p[y + PAD: y + band, x0: x0 + tile]
            assert (under < 128).any(), (row, col)
    plots.save_grid(x, path, nrow=2)
    plain = pixels(path)
    assert plain.shape[0] == 2 * (tile + PAD) + PAD
    assert (plain[tile + PAD: tile + 2 * PAD] == 255).all()  # between the rows: padding only

    # a row label column on the left and a title line on top
    row_labels = ["base", "a-checkpoint-label-much-too-long-for-one-tile-" * 3]
    plots.save_grid(x, path, nrow=2, labels=labels, row_labels=row_labels, title="a title")
    w, h = Image.open(path).size
    assert h == line_h + PAD + 2 * (tile + band + PAD) + PAD
    left = w - (2 * (tile + PAD) + PAD)
    assert 0 < left <= tile + 2 * PAD + line_h // 2  # row labels are shortened to a tile's width
    p = pixels(path)
    assert (p[PAD: tile, :left] < 128).any() and (p[: line_h, :] < 128).any()


def test_shorten_cuts_long_text_with_an_ellipsis():
    font, _ = plots.grid_font(128)
    short = "a cat"
    assert plots.shorten(short, font, 128) == short
    long = "a dolphin riding a bike on the moon, highly detailed, trending on artstation"
    cut = plots.shorten(long, font, 128)
    assert cut.endswith("…") and long.startswith(cut[:-1]) and len(cut) < len(long)
    assert font.getlength(cut) <= 128 < font.getlength(cut[:-1] + long[len(cut) - 1] + "…")  # the longest that fits
    assert plots.grid_font(1024)[0].size > plots.grid_font(128)[0].size  # the font grows with the tiles


def test_wrong_numbers_of_labels_raise(tmp_path):
    x = images(4)
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        plots.save_grid(x, str(tmp_path / "g.png"), labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="3 row_labels for 2 rows"):
        plots.save_grid(x, str(tmp_path / "g.png"), nrow=2, row_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        plots.grid_labels(["a", "b"], [1.0, 2.0, 3.0])
    assert not (tmp_path / "g.png").exists()
