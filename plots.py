"""
Pictures of a run: the reward curve against reward queries (rewards.png) and labelled image grids
(the trainers' samples, evaluate.py's comparisons, the toy world's figures). PNG files, written atomically.
"""

import functools
import math
import os

import torch

from common import fmt


def plot_rewards(records: list[dict], path: str, title: str = ""):
    """The training samples' reward (mean, +-std band) against cumulative reward queries, and, where the run
    evaluates (--eval.every), the plain policy's reward on fixed seeds (training and held-out prompts) -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evaluated = {k: [(r["reward_queries"], r[f"{k}_reward_mean"]) for r in records if r.get(f"{k}_reward_mean") is not None]
                 for k in ("plain", "heldout")}
    records = [r for r in records if r.get("reward_mean") is not None]  # not the evaluation before training
    x = [r["reward_queries"] for r in records]
    mean = [r["reward_mean"] for r in records]
    std = [r["reward_std"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, mean, marker="o", ms=3, label="reward (mean over the epoch's samples)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, label="± std")
    for k, label in (("plain", "plain policy, training prompts (fixed seeds)"), ("heldout", "plain policy, held-out prompts")):
        if evaluated[k]:
            ax.plot(*zip(*evaluated[k]), marker="s", ms=4, ls="--" if k == "heldout" else "-", label=label)
    explored = [r["reward_queries"] for r in records if r.get("exploring")]
    if explored:
        ax.axvspan(0, max(explored), color="orange", alpha=0.08, label="DiffExp exploration on")
    ax.set_xlabel("reward queries (generated training samples)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# Image grids: tiles upscaled so small images stay visible, each with an optional label in a band under
# it (its prompt and reward, say), an optional label left of each row and an optional title line.

GRID_PAD = 2  # pixels between tiles, as torchvision's make_grid


@functools.lru_cache(maxsize=8)
def grid_font(tile: int):
    """-> (font, line height in px) for labels under tiles `tile` px wide: DejaVu Sans (shipped with
    matplotlib) at 1/16 of the tile, at least 11 px (128 px tiles of the 32 px models); Pillow's own
    font where DejaVu cannot be found."""
    from PIL import ImageFont
    size = max(11, tile // 16)
    try:
        from matplotlib import font_manager
        font = ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except Exception:  # no matplotlib, or a matplotlib without its fonts
        font = ImageFont.load_default(size)
    return font, sum(font.getmetrics())  # ascent + descent


def shorten(text: str, font, width: float) -> str:
    """text cut to fit `width` px in `font`, with an ellipsis where it was cut."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # binary search for the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font.getlength(text[:mid].rstrip() + "…") <= width else (lo, mid - 1)
    return text[:lo].rstrip() + "…"


def grid_labels(prompts: list, rewards=None, name: str = "r") -> list[str]:
    """One save_grid label per image: 'prompt', or 'prompt\\nr=value' with the value to 3 significant
    digits. prompts: str or anything with .text (diffusion.Prompt); rewards: (N,) tensor, list or None."""
    texts = [getattr(p, "text", p) for p in prompts]
    if rewards is None:
        return texts
    values = [float(v) for v in (rewards.detach().flatten().tolist() if torch.is_tensor(rewards) else rewards)]
    if len(values) != len(texts):
        raise ValueError(f"grid_labels: {len(texts)} prompts but {len(values)} rewards.")
    return [f"{t}\n{name}={fmt(v)}" for t, v in zip(texts, values)]


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, labels: list[str] | None = None,
              row_labels: list[str] | None = None, title: str | None = None):
    """images (N, 3, H, W) in [0, 1] -> one PNG grid of nrow columns, upscaled so small images stay visible.
    labels: one per image, up to 2 lines each, drawn under its tile; row_labels: one per row, drawn left of
    it; title: one line above the grid. Every line is shortened to the space it has. Without any of them the
    PNG is exactly torchvision's save_image(images, padding=2, pad_value=1). Written atomically."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    images = images.detach().float().cpu()
    if images.shape[-1] < 128:  # tiny models make 32 px images: nearest upscaling keeps pixels honest
        images = F.interpolate(images, scale_factor=128 // images.shape[-1], mode="nearest")
    N, _, H, W = images.shape
    cols = min(nrow, N)
    rows = math.ceil(N / cols)
    if labels is not None and len(labels) != N:
        raise ValueError(f"save_grid: {len(labels)} labels for {N} images; give one label per image.")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"save_grid: {len(row_labels)} row_labels for {rows} rows ({N} images, nrow {nrow}); "
                         "give one per row.")

    # layout: [title band] over [row label column | tiles, each with its label band under it]
    font, line_h = grid_font(W)
    tile_lines = [[shorten(line, font, W) for line in t.split("\n")[:2]] for t in labels or []]
    band = GRID_PAD + line_h * max(map(len, tile_lines)) if labels else 0
    row_text = [shorten(t.split("\n")[0], font, W) for t in row_labels or []]
    left = int(max(map(font.getlength, row_text))) + 2 * GRID_PAD + line_h // 2 if row_labels else 0
    top = line_h + GRID_PAD if title else 0
    pitch_x, pitch_y = W + GRID_PAD, H + band + GRID_PAD
    canvas = torch.full((3, top + rows * pitch_y + GRID_PAD, left + cols * pitch_x + GRID_PAD), 255, dtype=torch.uint8)
    pixels = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)  # rounding as torchvision's save_image
    for k in range(N):
        y, x = top + GRID_PAD + (k // cols) * pitch_y, left + GRID_PAD + (k % cols) * pitch_x
        canvas[:, y: y + H, x: x + W] = pixels[k]
    grid = Image.fromarray(canvas.permute(1, 2, 0).numpy())

    draw, black = ImageDraw.Draw(grid), (0, 0, 0)
    for k, lines in enumerate(tile_lines):  # centred under the tile
        y, x = top + GRID_PAD + (k // cols) * pitch_y + H + GRID_PAD, left + GRID_PAD + (k % cols) * pitch_x
        for i, line in enumerate(lines):
            draw.text((x + (W - font.getlength(line)) / 2, y + i * line_h), line, fill=black, font=font)
    for r, text in enumerate(row_text):  # vertically centred on the row's tiles
        draw.text((GRID_PAD + line_h // 4, top + GRID_PAD + r * pitch_y + (H - line_h) / 2), text, fill=black, font=font)
    if title:
        text = shorten(title.split("\n")[0], font, grid.width - 2 * GRID_PAD)
        draw.text((GRID_PAD, GRID_PAD // 2), text, fill=black, font=font)
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
