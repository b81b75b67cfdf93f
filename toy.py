"""
The toy world: a small synthetic text-to-image task where guidance and rewards mean something on a CPU.

Images are 32x32: one shape (circle, square, triangle) in one of 6 colours on a grey background,
captioned "a {colour} {shape}"; the shape's size, its position and the background's tone are left open.
This file holds the world (generator, captions, renderer, prompt parsing), what can be read back off an
image (attributes, describe) and the toy rewards. It imports only torch, the standard library and common
(the classifier's loader reads its weights with safetensors), so that rewards.py can register the toy
rewards without the training code. toy_pretrain.py pretrains the toy model on this world (weights/toy),
trains the classifier reward's CNN and measures sampling schedules on the model (docs/toy-world.md).

Rewards (the project's reward signature; rewards.py registers TOY_REWARDS, TOY_DIFFERENTIABLE lists the
ones differentiable w.r.t. the images):
  toy-alignment     analytic, not differentiable: colour match x shape score in [0, 1]
  toy-classifier    differentiable: log p(colour) + log p(shape) under a small CNN trained on the world
  toy-aesthetic     analytic, differentiable, prompt-free: a "low-key" picture (dark background, small
                    shape on a thirds point) in [0, 1]
  toy-dial-dense, toy-dial-medium, toy-dial-sparse
                    analytic, differentiable, prompt-free: one preferred configuration (a small shape on a
                    thirds point) scored at three levels of sparsity, in [0, 1]
  toy-dial-success  the same configuration as success (1) or not (0); not differentiable (for DDPO)

Sections: the world | reading images back (and the alignment reward) | soft measurements and the
aesthetic reward | the sparsity dial | the classifier reward | the registry | describing a set of samples.
"""

import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# The world. A caption names two things (colour, shape); three others are left to the model and vary
# freely: the shape's size, its position, and the background's tone. Each has values that are rare in
# the data (small shapes, dark backgrounds, the margins of the frame), so some combinations of them are
# rare too (a small shape in a corner on a dark background: about 1 image in 100). This is the room a
# text-to-image model has for exploration: what the prompt does not say.

IMAGE_SIZE = 32
COLOURS = {  # RGB in [0, 1]; pairwise distances >= 0.42, distance to any background tone >= 0.45
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.10, 0.30, 0.95),
    "purple": (0.60, 0.15, 0.80),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
COLOUR_RGB = torch.tensor(list(COLOURS.values()))  # (6, 3)
COLOUR_JITTER = 0.03  # per-image, per-channel uniform jitter of the shape's colour
SIZE_RANGE = (3.5, 9.5)  # radius of the circle, in pixels, uniform; squares and triangles get the same area
SMALL_RADIUS = 5.0  # "small": radius below this (a quarter of the world's shapes)
DARK_FRACTION = 0.2  # background tone: dark with this probability, else light
DARK_TONES = (0.06, 0.20)  # grey level of a dark background (all three channels), uniform
LIGHT_TONES = (0.38, 0.72)  # grey level of a light background, uniform
DARK_BELOW = 0.29  # a background is "dark" below this grey level (between the two ranges)
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average 4x4 blocks


def caption(colour: int, shape: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}"


def all_captions() -> list[str]:
    return [caption(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]  # 18


def half_extent(radius: torch.Tensor) -> torch.Tensor:
    """Half the width (and height) of the widest shape of this area, the triangle: base = height = r sqrt(2 pi)."""
    return radius * math.sqrt(2 * math.pi) / 2


def sample_attributes(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n independent draws of the world's attributes. colour (n,) and shape (n,) indices (the caption);
    radius (n,) ~ U(SIZE_RANGE) px; centre (n, 2) as (x, y) px, uniform over the positions where the shape
    fits with a 1 px margin; background (n,) grey level, dark (U(DARK_TONES)) with probability
    DARK_FRACTION, else light (U(LIGHT_TONES)); rgb (n, 3) the prompted colour, jittered."""
    g = generator
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    lo, hi = SIZE_RANGE
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    extent = half_extent(radius) + 1
    centre = extent.unsqueeze(1) + (IMAGE_SIZE - 2 * extent).unsqueeze(1) * torch.rand(n, 2, generator=g)
    dark = torch.rand(n, generator=g) < DARK_FRACTION
    u = torch.rand(n, generator=g)
    background = torch.where(dark, DARK_TONES[0] + (DARK_TONES[1] - DARK_TONES[0]) * u,
                             LIGHT_TONES[0] + (LIGHT_TONES[1] - LIGHT_TONES[0]) * u)
    rgb = (COLOUR_RGB[colour] + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=g) - 1)).clamp(0, 1)
    return dict(colour=colour, shape=shape, radius=radius, centre=centre, background=background, rgb=rgb)


def render(attributes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Draws one shape per image -> (n, 3, 32, 32) in [0, 1]. All shapes are axis-aligned and have the area
    of a circle of `radius` (pi r^2), so size says nothing about the shape: square half-side r sqrt(pi)/2,
    upright isosceles triangle with base = height = r sqrt(2 pi)."""
    a = attributes
    S = IMAGE_SIZE * SUPERSAMPLE
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres, in pixels
    X, Y = coords.view(1, 1, S), coords.view(1, S, 1)
    cx, cy, r = a["centre"][:, 0].view(-1, 1, 1), a["centre"][:, 1].view(-1, 1, 1), a["radius"].view(-1, 1, 1)
    circle = (X - cx) ** 2 + (Y - cy) ** 2 <= r ** 2
    half = r * math.sqrt(math.pi) / 2
    square = ((X - cx).abs() <= half) & ((Y - cy).abs() <= half)
    e = half_extent(r)  # apex at (cx, cy - e), base at cy + e
    triangle = (Y <= cy + e) & ((X - cx).abs() <= (Y - (cy - e)) / 2)
    s = a["shape"].view(-1, 1, 1)
    inside = torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()  # (n, S, S)
    alpha = F.avg_pool2d(inside.unsqueeze(1), SUPERSAMPLE)  # (n, 1, 32, 32) coverage of each pixel
    return a["background"].view(-1, 1, 1, 1) * (1 - alpha) + a["rgb"].view(-1, 3, 1, 1) * alpha


def make_batch(n: int, generator: torch.Generator):
    """n random images of the world. Deterministic given the generator's state.
    Returns images (n, 3, 32, 32) float in [0, 1], captions list[str] ("a red circle"), and labels (n, 2)
    long: [colour index, shape index]. The prompt phrases of a caption are [colour, shape]."""
    a = sample_attributes(n, generator)
    captions = [caption(c, s) for c, s in zip(a["colour"].tolist(), a["shape"].tolist())]
    return render(a), captions, torch.stack([a["colour"], a["shape"]], 1)


def parse_prompt(prompt: str) -> tuple[int, int]:
    """'a red circle' (or 'a [red] [circle]') -> (colour index, shape index)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOURS), None)
    shape = next((SHAPES.index(w) for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ConfigError(f"toy rewards need prompts of the form 'a {{colour}} {{shape}}' with colour in "
                         f"{COLOUR_NAMES} and shape in {SHAPES}; got {prompt!r}.")
    return colour, shape


def world_images(captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """Images of the world for the given captions (n, 3, 32, 32): attributes drawn as in make_batch, colour and
    shape set by the caption (what the world itself draws for those prompts)."""
    a = sample_attributes(len(captions), generator)
    parsed = torch.tensor([parse_prompt(c) for c in captions])
    a["colour"], a["shape"] = parsed[:, 0], parsed[:, 1]
    a["rgb"] = (COLOUR_RGB[a["colour"]] + COLOUR_JITTER * (2 * torch.rand(len(captions), 3, generator=generator) - 1)).clamp(0, 1)
    return render(a)


def _targets(prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = torch.tensor([parse_prompt(p) for p in prompts], device=device)  # (B, 2)
    return parsed[:, 0], parsed[:, 1]


# -----------------------------------------------------------------------------
# Reading images back. The analytic rewards and the attribute measurements read the world's rules straight
# off the pixels: the background is the median colour of the image's border; the object is the largest
# region of pixels far enough from it; its colour is the mean of its interior; its shape is whichever ideal
# shape, fitted to the object's bounding box, overlaps it best; its size and position are its area and centroid.

FOREGROUND = 0.25  # a pixel is foreground when its RGB distance to the background exceeds this
COLOUR_SIGMA = 0.15  # colour match = exp(-d^2 / (2 sigma^2)), d = RGB distance to the prompted colour
SHAPE_TEMPERATURE = 0.03  # softmax temperature over the 3 shapes' IoUs
MIN_AREA = 9  # pixels; a smaller object (or none) scores 0


def background_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3): the per-channel median of the image's 1-pixel border. The object rarely touches the border
    (the world keeps a margin), and where it does, the median ignores it. Differentiable almost everywhere."""
    x = images.float()
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (B, 3, 124)
    return border.median(dim=-1).values


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the largest 8-connected region of pixels far from the background. Taking the
    largest region makes isolated specks of noise (common in half-trained samples) not count as the object."""
    x = images.float()
    fg = ((x - background_colour(x)[:, :, None, None]).norm(dim=1) > FOREGROUND).unsqueeze(1)  # (B, 1, H, W)
    B, _, H, W = fg.shape
    # Connected components by propagation: every foreground pixel starts with its own id, then takes the
    # largest id in its 3x3 neighbourhood until nothing changes; each region ends with one id.
    ids = torch.arange(1, H * W + 1, device=fg.device, dtype=torch.float32).view(1, 1, H, W)
    label = torch.where(fg, ids, 0.0)
    for _ in range(H * W):
        new = torch.where(fg, F.max_pool2d(label, 3, stride=1, padding=1), 0.0)
        if torch.equal(new, label):
            break
        label = new
    label = label.long().view(B, H * W)
    area = torch.zeros(B, H * W + 1, device=fg.device).scatter_add_(1, label, torch.ones(label.shape, device=fg.device))
    area[:, 0] = 0  # id 0 is the background
    return (label == area.argmax(1, keepdim=True)).view(B, H, W) & fg.view(B, H, W)
def object_colour(images: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Mean RGB (B, 3) of the object's interior: the foreground eroded by one pixel, which drops the
    anti-aliased rim (half grey); falls back to the whole foreground for objects thinner than 3 px."""
    interior = -F.max_pool2d(-fg.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1)  # (B, H, W) erosion
    mask = torch.where(interior.sum((1, 2), keepdim=True) > 0, interior, fg.float()).unsqueeze(1)  # (B, 1, H, W)
    return (images.float() * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)


def shape_ious(fg: torch.Tensor) -> torch.Tensor:
    """IoU (B, 3) of the foreground with the ideal circle (inscribed ellipse), square (the box) and upright
    triangle (apex at the top middle, base = the bottom edge), each drawn in the foreground's bounding box
    and sampled at pixel centres, as the rendered shapes are."""
    B, H, W = fg.shape
    ys = torch.arange(H, device=fg.device, dtype=torch.float32)
    xs = torch.arange(W, device=fg.device, dtype=torch.float32)
    rows, cols = fg.any(2), fg.any(1)  # (B, H), (B, W)
    top = torch.where(rows, ys, float(H)).amin(1).view(B, 1, 1)  # box edges, in pixel coordinates
    bottom = torch.where(rows, ys + 1, 0.0).amax(1).view(B, 1, 1)
    left = torch.where(cols, xs, float(W)).amin(1).view(B, 1, 1)
    right = torch.where(cols, xs + 1, 0.0).amax(1).view(B, 1, 1)
    h, w = (bottom - top).clamp(min=1), (right - left).clamp(min=1)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    Y, X = ys.view(1, H, 1) + 0.5, xs.view(1, 1, W) + 0.5  # pixel centres
    box = (Y > top) & (Y < bottom) & (X > left) & (X < right)
    ideal = torch.stack([
        ((X - cx) / (w / 2)) ** 2 + ((Y - cy) / (h / 2)) ** 2 <= 1,  # circle
        box,  # square
        box & ((X - cx).abs() <= (w / 2) * (Y - top) / h),  # triangle
    ], 1)  # (B, 3, H, W)
    fg = fg.unsqueeze(1)
    return (ideal & fg).sum((2, 3)) / (ideal | fg).sum((2, 3)).clamp(min=1)


def alignment_scores(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The parts of the toy-alignment reward, each (B,): colour match, shape score, their product."""
    fg = object_mask(images)
    colour_idx, shape_idx = _targets(prompts, images.device)
    d2 = (object_colour(images, fg) - COLOUR_RGB.to(images.device)[colour_idx]).pow(2).sum(1)
    colour = torch.exp(-d2 / (2 * COLOUR_SIGMA ** 2))
    # Shape score: how well the prompted ideal shape fits (its IoU) times how clearly it beats the other
    # two (softmax over the IoUs). A circle also fits its box fairly well (IoU ~0.79), hence the softmax.
    ious = shape_ious(fg)  # (B, 3)
    iou = ious.gather(1, shape_idx[:, None]).squeeze(1)
    shape = iou * torch.softmax(ious / SHAPE_TEMPERATURE, 1).gather(1, shape_idx[:, None]).squeeze(1)
    present = fg.sum((1, 2)) >= MIN_AREA
    return {"colour": colour, "shape": shape, "alignment": torch.where(present, colour * shape, 0.0)}


def toy_alignment(device="cpu", dtype=torch.float32, tiny=False, weights=None):
    """Analytic prompt alignment in [0, 1] (not differentiable): colour match x shape score.
    Images from the world score ~0.9 with their own caption and ~0 with a wrong one."""
    @torch.no_grad()
    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return alignment_scores(images, prompts)["alignment"].float()
    return reward_fn


def attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unspecified attributes read off images (B, 3, H, W), each (B,): `present` (an object of at least
    MIN_AREA pixels), `radius` (equivalent radius sqrt(area / pi) of the object mask, px), `x`, `y` (its
    centroid, px from the top left), `tone` (the background's grey level: mean of its three channels)."""
    fg = object_mask(images).float()
    area = fg.sum((1, 2))
    H, W = fg.shape[1:]
    ys = torch.arange(H, device=fg.device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=fg.device, dtype=torch.float32) + 0.5
    mass = area.clamp(min=1)
    return {"present": area >= MIN_AREA, "radius": (area / math.pi).sqrt(),
            "x": (fg * xs.view(1, 1, W)).sum((1, 2)) / mass, "y": (fg * ys.view(1, H, 1)).sum((1, 2)) / mass,
            "tone": background_colour(images).mean(1)}


# -----------------------------------------------------------------------------
# Soft measurements and the aesthetic reward. The rewards that fine-tuning differentiates need measurements
# with a gradient: a soft object mask instead of the hard one above gives the object's size and centroid,
# the background's tone and flatness, each differentiable w.r.t. the pixels.

THIRDS = (IMAGE_SIZE / 3, 2 * IMAGE_SIZE / 3)  # the rule of thirds: centroids near (x, y) in THIRDS x THIRDS


def soft_measurements(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Differentiable measurements, each (B,). A soft object mask m (0 at the background colour, 1 at RGB
    distance >= 0.28 from it) gives the object's `area` (px), equivalent `radius` sqrt(area / pi) and
    centroid `x`, `y` (px from the top left); the background (1 - m) its `tone` (mean grey level) and
    `roughness` (0 for a flat background); `contrast` is the object's mean distance from the background
    colour; `clean` in [0, 1] gates on one clean, vivid object (at least 9 px) on a flat background: noise,
    specks, a colour blowout or an empty frame score about 0."""
    x = images.float()
    B, _, H, W = x.shape
    bg = background_colour(x)  # (B, 3)
    diff = x - bg[:, :, None, None]  # (B, 3, H, W)
    dist = diff.norm(dim=1)  # (B, H, W)
    m = ((dist - 0.12) / 0.16).clamp(0, 1)
    back = 1 - m
    back_n = back.sum((1, 2)).clamp(min=1.0)
    area = m.sum((1, 2))
    mass = area.clamp(min=1e-3)
    ys = torch.arange(H, device=x.device, dtype=x.dtype) + 0.5
    xs = torch.arange(W, device=x.device, dtype=x.dtype) + 0.5
    cx, cy = (m * xs.view(1, 1, W)).sum((1, 2)) / mass, (m * ys.view(1, H, 1)).sum((1, 2)) / mass
    tone = (back * x.mean(1)).sum((1, 2)) / back_n  # mean grey level of the background
    roughness = (back * diff.abs().mean(1)).sum((1, 2)) / back_n  # 0 for a flat background
    contrast = (m * dist).sum((1, 2)) / mass  # the object's mean distance from the background colour
    return {"area": area, "radius": (area / math.pi).sqrt(), "x": cx, "y": cy, "tone": tone,
            "roughness": roughness, "contrast": contrast,
            "clean": torch.exp(-(roughness / 0.03) ** 2) * (contrast / 0.4).clamp(max=1) * torch.sigmoid(area - 9)}


def thirds_offsets(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|dx|, |dy| (B,) from centroids (x, y) to the nearest of the four thirds points, px."""
    thirds = torch.tensor(THIRDS, device=x.device, dtype=x.dtype)
    return (x[:, None] - thirds).abs().amin(1), (y[:, None] - thirds).abs().amin(1)


# The aesthetic analogue. LAION's aesthetic score prefers a style Stable Diffusion rarely draws unprompted;
# here the preferred style is a configuration of what the caption leaves open: a "low-key" picture, with
# a small shape placed on a third of the frame over a dark background. The world draws it about 1 time in
# 100 (dark 1/5, small 1/4, near a thirds point about 1/5); experiments.md gives its rarity under each
# sampling schedule of the base model. Each part is a smooth score in [0, 1], so every sample carries a
# gradient towards each of them; a clean, vivid object is required (a gate, not a part), so noise,
# specks or a colour blowout score near 0.

AESTHETIC_RADIUS = 4.5  # px: the preferred equivalent radius (small: the world draws 3.5 .. 9.5)
AESTHETIC_WEIGHTS = (0.4, 0.3, 0.3)  # dark background, small, on a thirds point


def aesthetic_parts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of toy-aesthetic, each (B,) in [0, 1] and differentiable w.r.t. the images, from
    soft_measurements: a dark background, a small shape, its centroid on a thirds point, and the gate."""
    s = soft_measurements(images)
    d_x, d_y = thirds_offsets(s["x"], s["y"])  # to the nearest third
    return {
        "dark": torch.sigmoid((DARK_BELOW - s["tone"]) / 0.05),
        "small": torch.exp(-((s["radius"] - AESTHETIC_RADIUS) / 1.5) ** 2),
        "thirds": torch.exp(-(d_x ** 2 + d_y ** 2) / (2 * 2.0 ** 2)),
        "clean": s["clean"],  # the gate: one clean, vivid object (at least 9 px) on a flat background
    }


def toy_aesthetic(device="cpu", dtype=torch.float32, tiny=False, weights=None):
    """A prompt-free analogue of the aesthetic score in [0, 1], differentiable: clean x (0.4 dark background
    + 0.3 small shape + 0.3 on a thirds point); see aesthetic_parts. World images score 0.25 on average;
    the low-key configuration (all three) scores near 1."""
    w_dark, w_small, w_thirds = AESTHETIC_WEIGHTS

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = aesthetic_parts(images)
        return (p["clean"] * (w_dark * p["dark"] + w_small * p["small"] + w_thirds * p["thirds"])).float()
    return reward_fn


# -----------------------------------------------------------------------------
# The sparsity dial. toy-aesthetic is dense (every sample carries a gradient towards each of its parts), a
# weak test of DiffExp's premise: that high-reward images exist, guidance makes them rare, and nothing
# points the sampler to them. The dial's rewards all score ONE preferred configuration, built only from
# what CFG 5 suppresses and DiffExp's schedule restores (experiments.md, section 6.2): a small shape
# (equivalent radius near AESTHETIC_RADIUS = 4.5 px) with its centroid near one of the four thirds points;
# the background's tone does not count. D is the distance from that configuration, in units of
# DIAL_SCALES (the radius 1.25 px off, or the centroid 2 px from a thirds point, is one unit), measured with
# soft_measurements; a level of temperature tau scores gate x exp(-D^2 / (2 tau^2)), in [0, 1]. The base
# model's typical CFG 5 sample (a large shape near the centre) lies at D ~ 4.7:
#   dense  (tau 4):   a real score and gradient everywhere (D 4.7: 0.5)
#   medium (tau 1.5): real signal within about 3 units (D 3: 0.14), little beyond (D 4.7: 0.007)
#   sparse (tau 0.5): near-zero value and gradient outside the configuration (D 2: 3e-4; D 4.7: 7e-20)
# Success is the same at every level: D <= 1 with a clean object (gate 1). A level's success level is
# exp(-1 / (2 tau^2)), the score of a clean object at D = 1: every success reaches it, and whatever reaches
# it lies within D <= 1 (with a gate of at least that level). toy-dial-success is the binary success
# itself, for DDPO. The gate is soft_measurements' clean, saturated at DIAL_CLEAN: 1 for a clear object, with
# or without the faint background grain that eta-0 samples keep (which toy-aesthetic's gate penalises: 29%
# of the base model's DiffExp samples at eta 0 have clean below 0.7, 2% below 0.2; experiments.md, section
# 7), 0 for an empty or blown-out frame, about 1e-3 for noise.

DIAL_LEVELS = {"dense": 4.0, "medium": 1.5, "sparse": 0.5}  # the temperature tau of each level
DIAL_SCALES = (1.25, 2.0)  # px per unit of D: the radius's offset from AESTHETIC_RADIUS, the centroid's distance to a thirds point
DIAL_CLEAN = 0.2  # gate = min(1, clean / DIAL_CLEAN)


def dial_parts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dial's measurements, each (B,) and differentiable w.r.t. the images: `sq_distance` D^2 from the
    preferred configuration (in units of DIAL_SCALES) and the `gate` in [0, 1] (1: a clean object)."""
    s = soft_measurements(images)
    d_x, d_y = thirds_offsets(s["x"], s["y"])
    r_scale, p_scale = DIAL_SCALES
    sq_distance = ((s["radius"] - AESTHETIC_RADIUS) / r_scale) ** 2 + (d_x ** 2 + d_y ** 2) / p_scale ** 2
    return {"sq_distance": sq_distance, "gate": (s["clean"] / DIAL_CLEAN).clamp(max=1)}


def dial_reward(images: torch.Tensor, temperature: float) -> torch.Tensor:
    """gate x exp(-D^2 / (2 temperature^2)) (B,) in [0, 1], differentiable; see the dial's notes above."""
    p = dial_parts(images)
    return (p["gate"] * torch.exp(-p["sq_distance"] / (2 * temperature ** 2))).float()


def dial_success(images: torch.Tensor) -> torch.Tensor:
    """1.0 where D <= 1 with a clean object (gate 1), else 0.0 (B,): success, the same at every level."""
    p = dial_parts(images)
    return ((p["sq_distance"] <= 1) & (p["gate"] >= 1)).float()


def toy_dial(level: str):
    """The reward factory of one level of the dial (DIAL_LEVELS): prompt-free, differentiable, in [0, 1]."""
    temperature = DIAL_LEVELS[level]

    def factory(device="cpu", dtype=torch.float32, tiny=False, weights=None):
        return lambda images, prompts: dial_reward(images, temperature)
    factory.__name__ = f"toy_dial_{level}"
    factory.__doc__ = (f"toy-dial-{level}: gate x exp(-D^2 / (2 x {temperature:g}^2)) in [0, 1], differentiable; "
                       f"success at {dial_success_level(temperature):.4f} (D = 1).")
    return factory


def toy_dial_success(device="cpu", dtype=torch.float32, tiny=False, weights=None):
    """toy-dial-success: 1 in the dial's preferred configuration (D <= 1, a clean object), else 0. Not
    differentiable: the sparse end of the dial as DDPO sees it."""
    @torch.no_grad()
    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return dial_success(images)
    return reward_fn


def dial_success_level(temperature: float) -> float:
    """The score of a clean object at D = 1 under a level of this temperature: exp(-1 / (2 temperature^2))."""
    return math.exp(-1 / (2 * temperature ** 2))


# -----------------------------------------------------------------------------
# Classifier reward: a small CNN with a colour head and a shape head, trained on the world.

CLASSIFIER_PATH = os.path.join(HERE, "weights", "toy_classifier.safetensors")


class ToyClassifier(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> colour logits (B, 6), shape logits (B, 3). ~130k parameters."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 2 * width, 4 * width)
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            # stride 1 first (colour and edges at full resolution), then 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], len(COLOURS) + len(SHAPES))

    def forward(self, images: torch.Tensor):
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        h = self.features((images - 0.5) / 0.25).mean((2, 3))  # (B, 4 * width), global average pool
        logits = self.head(h)
        return logits[:, :len(COLOURS)], logits[:, len(COLOURS):]


def toy_classifier(device="cpu", dtype=torch.float32, tiny=False, weights=None):
    """Differentiable prompt alignment: log p(prompted colour) + log p(prompted shape) under ToyClassifier,
    i.e. the log-probability of the prompt's (colour, shape) pair with the two heads taken as independent.
    Range (-inf, 0]; 0 = certain match. tiny: random weights (no file); weights: path to a .safetensors."""
    from safetensors.torch import load_file
    model = ToyClassifier()
    if not tiny:
        path = weights or CLASSIFIER_PATH
        if not os.path.isfile(path):
            raise ConfigError(f"toy-classifier: no weights at {path}; train them with `python toy_pretrain.py train-classifier`.")
        model.load_state_dict(load_file(path))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        colour_idx, shape_idx = _targets(prompts, images.device)
        colour_logits, shape_logits = model(images.to(dtype))
        log_p_colour = colour_logits.float().log_softmax(1).gather(1, colour_idx[:, None]).squeeze(1)
        log_p_shape = shape_logits.float().log_softmax(1).gather(1, shape_idx[:, None]).squeeze(1)
        return log_p_colour + log_p_shape  # (B,)
    return reward_fn


# -----------------------------------------------------------------------------
# The registry (rewards.py merges it into its own), and the success level of each of the dial's rewards: a
# sample succeeds when its reward is at or above it.

TOY_REWARDS = {"toy-alignment": toy_alignment, "toy-classifier": toy_classifier, "toy-aesthetic": toy_aesthetic,
               **{f"toy-dial-{level}": toy_dial(level) for level in DIAL_LEVELS}, "toy-dial-success": toy_dial_success}
TOY_DIFFERENTIABLE = frozenset({"toy-classifier", "toy-aesthetic", *(f"toy-dial-{level}" for level in DIAL_LEVELS)})  # w.r.t. the images
DIAL_SUCCESS_LEVELS = {**{f"toy-dial-{level}": dial_success_level(t) for level, t in DIAL_LEVELS.items()},
                       "toy-dial-success": 1.0}


# -----------------------------------------------------------------------------
# Describing a set of samples: prompt fidelity, the spread of what the caption leaves open, and the rewards.
# The rows of toy_pretrain.py's evaluation table; experiments/toy_study.py describes final policies with it.

def entropy(labels: torch.Tensor) -> float:
    """Plug-in entropy (nats) of integer labels (N,)."""
    p = torch.bincount(labels).float()
    p = p[p > 0] / len(labels)
    return -(p * p.log()).sum().item()


def describe(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """One row of the evaluation table for samples (N, 3, 32, 32) of prompts: prompt fidelity, the spread of
    the unspecified attributes, and each reward's mean and 90th percentile."""
    parts, a = alignment_scores(images, prompts), attributes(images)
    third = lambda v: (v / (IMAGE_SIZE / 3)).long().clamp(0, 2)  # noqa: E731  (0, 1, 2: which third of the frame)
    cell = third(a["x"]) * 3 + third(a["y"])  # 3 x 3 position cells
    size = torch.bucketize(a["radius"], torch.tensor([SMALL_RADIUS, 7.0]))  # small / medium / large
    dark = a["tone"] < DARK_BELOW
    row = {"alignment": parts["alignment"].mean().item(), "colour": parts["colour"].mean().item(),
           "shape": parts["shape"].mean().item(),
           "position_entropy": max(0.0, entropy(cell)), "layout_entropy": max(0.0, entropy((cell * 3 + size) * 2 + dark.long())),
           "present": a["present"].float().mean().item(), "radius_std": a["radius"][a["present"]].std().item(),
           "small": ((a["radius"] < SMALL_RADIUS) & a["present"]).float().mean().item(),
           "dark": dark.float().mean().item(), "edge": ((cell != 4) & a["present"]).float().mean().item()}
    for name in ("toy-classifier", "toy-aesthetic"):
        r = TOY_REWARDS[name]()(images, prompts)
        row[name] = r.mean().item()
        row[name + "_p90"] = r.quantile(0.9).item()
        if name == "toy-aesthetic":  # how often the low-key configuration is (nearly) drawn
            row["aesthetic_above_0.6"] = (r > 0.6).float().mean().item()
    return row
