"""
The toy world: a small synthetic text-to-image task where guidance and rewards mean something on a CPU.

Images are 32x32: one shape (circle, square, triangle) in one of 6 colours on a grey background,
captioned "a {colour} {shape}". A pixel-space diffusion model (a small UNet2DConditionModel with a
2-layer CLIP text encoder, no VAE) is pretrained on this world; reward fine-tuning then has to make
it follow the prompt, and the rewards below say exactly how well it does.

    python toy.py pretrain --out weights/toy --minutes 25      # diffusers folder (8.7 MB), see below
    python toy.py train-classifier                             # weights/toy_classifier.safetensors (0.5 MB)
    python toy.py eval --model weights/toy                     # alignment reward: unguided vs CFG vs DiffExp
    # then fine-tune with the trainers' --model weights/toy --prompts prompts/toy_train.txt --reward.name toy-alignment

The shipped weights/toy came from two runs on a 2-core CPU shared with other work (1 thread; 1252 + 818
steps; weights/toy/training_info.json records both configs):

    python toy.py pretrain --out weights/toy --minutes 30 --threads 1
    python toy.py pretrain --init weights/toy --out weights/toy --minutes 40 --threads 1 \
        --batch-size 64 --lr 5e-4 --warmup-steps 50 --min-snr-gamma 0

The model samples with x0 clipping (scheduler clip_sample=True, see TOY_SCHEDULER).

Rewards (the project's reward signature; rewards.py registers TOY_REWARDS):
  toy-alignment   analytic, not differentiable: colour match x shape score in [0, 1]
  toy-classifier  differentiable: log p(colour) + log p(shape) under a small CNN trained on the world
  toy-aesthetic   analytic and differentiable: a prompt-free "size and centring" score in [0, 1]

Sections: the world | analytic rewards | classifier reward | pretraining | evaluation | CLI.
"""

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
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


# The aesthetic analogue. LAION's aesthetic score prefers a style Stable Diffusion rarely draws unprompted;
# here the preferred style is a configuration of what the caption leaves open: a "low-key" picture, with
# a small shape placed on a third of the frame over a dark background. The world draws it about 1 time in
# 100 (dark 1/5, small 1/4, near a thirds point about 1/5); experiments.md gives its rarity under each
# sampling schedule of the base model. Each part is a smooth score in [0, 1], so every sample carries a
# gradient towards each of them; a clean, vivid object is required (a gate, not a part), so noise,
# specks or a colour blowout score near 0.

AESTHETIC_RADIUS = 4.5  # px: the preferred equivalent radius (small: the world draws 3.5 .. 9.5)
THIRDS = (IMAGE_SIZE / 3, 2 * IMAGE_SIZE / 3)  # the rule of thirds: centroids near (x, y) in THIRDS x THIRDS
AESTHETIC_WEIGHTS = (0.4, 0.3, 0.3)  # dark background, small, on a thirds point


def aesthetic_parts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of toy-aesthetic, each (B,) and differentiable w.r.t. the images. A soft object mask m
    (0 at the background colour, 1 at RGB distance >= 0.28 from it) gives the object's area, equivalent
    radius and centroid; the background (1 - m) gives its tone and how flat it is."""
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
    thirds = torch.tensor(THIRDS, device=x.device, dtype=x.dtype)
    d_x, d_y = (cx[:, None] - thirds).abs().amin(1), (cy[:, None] - thirds).abs().amin(1)  # to the nearest third
    radius = (area / math.pi).sqrt()
    return {
        "dark": torch.sigmoid((DARK_BELOW - tone) / 0.05),
        "small": torch.exp(-((radius - AESTHETIC_RADIUS) / 1.5) ** 2),
        "thirds": torch.exp(-(d_x ** 2 + d_y ** 2) / (2 * 2.0 ** 2)),
        # the gate: one clean, vivid object (at least 9 px) on a flat background
        "clean": torch.exp(-(roughness / 0.03) ** 2) * (contrast / 0.4).clamp(max=1) * torch.sigmoid(area - 9),
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
            raise ConfigError(f"toy-classifier: no weights at {path}; train them with `python toy.py train-classifier`.")
        model.load_state_dict(load_file(path))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        colour_idx, shape_idx = _targets(prompts, images.device)
        colour_logits, shape_logits = model(images.to(dtype))
        log_p_colour = colour_logits.float().log_softmax(1).gather(1, colour_idx[:, None]).squeeze(1)
        log_p_shape = shape_logits.float().log_softmax(1).gather(1, shape_idx[:, None]).squeeze(1)
        return log_p_colour + log_p_shape  # (B,)
    return reward_fn


TOY_REWARDS = {"toy-alignment": toy_alignment, "toy-classifier": toy_classifier, "toy-aesthetic": toy_aesthetic}
TOY_DIFFERENTIABLE = frozenset({"toy-classifier", "toy-aesthetic"})  # w.r.t. the images


@dataclass
class ClassifierConfig:
    out: str = os.path.join("weights", "toy_classifier.safetensors")  # where the weights go (safetensors, fp32)
    steps: int = 600  # optimizer steps
    batch_size: int = 128  # fresh world images per step
    lr: float = 2e-3  # AdamW, cosine decay to 0
    noise: float = 0.1  # Gaussian pixel noise of std U(0, noise) per image, so near-miss samples still classify
    seed: int = 0  # data and init seed
    threads: int = 1  # torch CPU threads


def train_classifier(cfg: ClassifierConfig):
    from safetensors.torch import save_file
    from tqdm import tqdm
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for step in (bar := tqdm(range(cfg.steps), desc="classifier")):
        images, _, labels = make_batch(cfg.batch_size, g)
        images = images + cfg.noise * torch.rand(cfg.batch_size, 1, 1, 1, generator=g) * torch.randn(images.shape, generator=g)
        colour_logits, shape_logits = model(images.clamp(0, 1))
        loss = F.cross_entropy(colour_logits, labels[:, 0]) + F.cross_entropy(shape_logits, labels[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    # held-out accuracy on a fresh seed
    model.eval()
    with torch.no_grad():
        images, _, labels = make_batch(2048, torch.Generator().manual_seed(cfg.seed + 12345))
        colour_logits, shape_logits = model(images)
    acc_c = (colour_logits.argmax(1) == labels[:, 0]).float().mean().item()
    acc_s = (shape_logits.argmax(1) == labels[:, 1]).float().mean().item()
    print(f"held-out accuracy: colour {acc_c:.4f}, shape {acc_s:.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cfg.out,
              metadata={"config": json.dumps(asdict(cfg)), "accuracy_colour": f"{acc_c:.4f}", "accuracy_shape": f"{acc_s:.4f}"})
    print(f"wrote {cfg.out} ({os.path.getsize(cfg.out) / 1e3:.0f} kB)")


# -----------------------------------------------------------------------------
# Pretraining: UNet + text encoder from scratch, jointly, with the DDPM epsilon loss.

# A pixel-space UNet for 32x32 images: 32 -> 16 -> 8, with cross-attention to the prompt at 8x8 (in the
# down, middle and up blocks; the attention blocks are where LoRA goes, and at 8x8 they are cheap). 2.2 M
# parameters. Attention at 16x16 as well cost 1.6x the time per step on a 2-core CPU; a 2x2 space-to-depth
# view would need a decoder the shared sampler does not have. Stored in float16 (4.5 MB).
TOY_UNET = dict(
    sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(32, 48, 96), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
# A 2-layer CLIP text encoder. The real CLIP vocabulary (49408 tokens) keeps the tokenizer, prompt
# weighting and phrase positions exactly as for Stable Diffusion; the token table dominates the size.
TOY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# Betas: DDPM's linear 1e-4 .. 0.02 (Ho et al. 2020, there for 32x32 CIFAR-10), not Stable Diffusion's
# scaled_linear 0.00085 .. 0.012. SD's schedule, tuned for latents, ends at alpha_bar_999 = 0.0047 (7% of
# the signal left). In pixel space the image's mean colour is an average over 1024 pixels, so that 7% stands
# well above the noise (std 1/32), and a model trained on it would read a colour into the pure noise it is
# sampled from. The linear schedule ends at alpha_bar_999 = 4e-5: pure noise even for the mean colour.
# clip_sample: the sampler clips the predicted x0 to [-1, 1] at every step, as DDPM samples its pixel-space
# models. With epsilon prediction x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies the UNet's error by
# up to 1 / sqrt(a) ~ 100 at the first steps; unclipped, a briefly trained model floods the whole image with
# colour. The rest follows SD (leading spacing, steps_offset 1: 20 DDIM steps visit t = 951, 901, ..., 1),
# so the default t_thres = 800 gives w_low to the first 4 of 20 steps.
# DiffExp's t_thres on this schedule. t_thres is a point on the noise scale, and the paper's values were set
# for Stable Diffusion's scaled_linear schedule, under which t = 800 leaves alpha_bar = 0.037 of the signal.
# This linear schedule is far noisier at the same t (alpha_bar_800 = 0.0015: pure noise, nothing is decided
# there), and reaches alpha_bar = 0.037 at t = 570. The toy presets therefore use the paper's thresholds
# mapped by equal alpha_bar (snr_matched_t): 800 -> 570, and the ablations 900 -> 650, 700 -> 495.
T_THRES = 570
T_THRES_ABLATIONS = (650, 495)


def snr_matched_t(t_sd: int) -> int:
    """The timestep of TOY_SCHEDULER whose alpha_bar (so signal-to-noise ratio) is closest to Stable Diffusion's at t_sd."""
    from diffusers import DDIMScheduler
    from diffusion import SD15_SCHEDULER
    sd, toy = DDIMScheduler(**SD15_SCHEDULER).alphas_cumprod, DDIMScheduler(**TOY_SCHEDULER).alphas_cumprod
    return int((toy - sd[t_sd]).abs().argmin())


TOY_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


@dataclass
class PretrainConfig:
    out: str = os.path.join("weights", "toy")  # diffusers folder: unet/ text_encoder/ tokenizer/ scheduler/ (no vae/)
    steps: int = 4500  # optimizer steps; the learning-rate schedule is laid out over them
    minutes: float = 0.0  # optional wall-clock cap: stop early (saving) after this many minutes; 0 = none
    batch_size: int = 64  # fresh world images per step
    lr: float = 8e-4  # AdamW peak learning rate; linear warm-up, then cosine decay to lr / 10 at `steps`
    warmup_steps: int = 200  # linear learning-rate warm-up, in optimizer steps
    weight_decay: float = 0.0  # AdamW weight decay
    caption_dropout: float = 0.15  # fraction of captions replaced by "" (the unconditional prompt for CFG)
    min_snr_gamma: float = 0.0  # Min-SNR loss weighting (Hang et al. 2023): weight min(SNR, gamma) / SNR; 0 = off
    ema_decay: float = 0.998  # EMA of the weights (what gets saved); effective decay min(this, (1+k)/(10+k))
    save_every_minutes: float = 10.0  # also write the EMA weights during training, so an interrupted run leaves a model
    seed: int = 0  # init and data seed
    init: str = ""  # start from the weights of this toy model folder instead of random ones (train longer)
    threads: int = 2  # torch CPU threads
    device: str = "cpu"  # cpu | cuda: the same code and data stream (drawn on the CPU)


def build_toy_model(seed: int = 0):
    """Fresh (unet, text_encoder, tokenizer, scheduler) with seeded random weights."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusion import build_clip_tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TOY_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TOY_TEXT))
    return unet, text_encoder, build_clip_tokenizer(), DDIMScheduler(**TOY_SCHEDULER)


def save_tokenizer(tokenizer, folder: str):
    """CLIP's tokenizer as vocab.json + merges.txt + tokenizer_config.json (1.5 MB), the files of SD's
    tokenizer/ folder, instead of the 3.6 MB tokenizer.json that save_pretrained writes. Same ids."""
    tokenizer.save_pretrained(folder)
    os.remove(os.path.join(folder, "tokenizer.json"))
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]  # {"vocab": {token: id}, "merges": [[a, b]]}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(bpe["vocab"], f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in bpe["merges"]) + "\n")


def save_toy_model(out: str, unet, text_encoder, tokenizer, scheduler, info: dict):
    """Writes the diffusers folder to a temporary name, then swaps it in. Both networks are stored in
    float16, which keeps the folder under 10 MB (the text encoder's 49408 x 32 token table alone is 6 MB in
    float32); fp16 rounding (5e-4 relative) is far below what matters here. Loaders cast to their own dtype."""
    import copy
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(unet).half().save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    copy.deepcopy(text_encoder).half().save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
    save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def pretrain(cfg: PretrainConfig):
    from tqdm import tqdm
    from diffusion import tokenize
    torch.set_num_threads(cfg.threads)
    device = torch.device(common.resolve_device(cfg.device))
    unet, text_encoder, tokenizer, scheduler = build_toy_model(cfg.seed)
    init_info = None
    if cfg.init:  # continue from an earlier run's (EMA) weights: same architecture, fresh optimizer and schedule
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        unet = UNet2DConditionModel.from_pretrained(cfg.init, subfolder="unet").float()
        text_encoder = CLIPTextModel.from_pretrained(cfg.init, subfolder="text_encoder").float()
        with open(os.path.join(cfg.init, "training_info.json")) as f:
            init_info = json.load(f)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)  # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # The 18 captions and "" tokenised once: (19, 77) ids; a batch picks rows.
    texts = all_captions() + [""]
    ids_table = tokenize(tokenizer, texts).to(device)
    row_of = {t: i for i, t in enumerate(texts)}
    g = torch.Generator().manual_seed(cfg.seed)
    start = last_save = time.time()
    step, smooth_loss = 0, None

    def out_of_time():
        return cfg.minutes > 0 and time.time() - start > cfg.minutes * 60

    def save(final: bool):
        live = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):  # save the EMA weights, then put the live ones back
            p.data.copy_(e)
        info = dict(config=asdict(cfg), steps=step, minutes=(time.time() - start) / 60, loss=smooth_loss,
                    final=final, init=init_info, torch=torch.__version__, cpu_count=os.cpu_count())
        save_toy_model(cfg.out, unet, text_encoder, tokenizer, scheduler, info)
        for p, l in zip(params, live):
            p.data.copy_(l)
        tqdm.write(f"saved EMA weights to {cfg.out} (step {step})")

    bar = tqdm(total=cfg.steps, desc="pretrain", mininterval=10)
    while step < cfg.steps and not out_of_time():
        images, captions, _ = make_batch(cfg.batch_size, g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        rows = torch.tensor([row_of["" if d else c] for c, d in zip(captions, drop.tolist())])
        x0 = (images * 2 - 1).to(device)  # (B, 3, 32, 32) in [-1, 1]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # forward process q(x_t | x_0)
        hidden = text_encoder(ids_table[rows.to(device)])[0]  # (B, 77, 32)
        eps = unet(x_t, t, encoder_hidden_states=hidden).sample
        per_sample = (eps - noise).pow(2).mean((1, 2, 3))  # (B,)
        weight = (snr[t].clamp(max=cfg.min_snr_gamma) / snr[t]) if cfg.min_snr_gamma > 0 else torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        smooth_loss = loss.item() if smooth_loss is None else 0.98 * smooth_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth_loss:.4f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            tqdm.write(f"step {step} | loss {smooth_loss:.4f} | lr {lr:.2e} | {(time.time() - start) / step:.2f} s/step")
        if time.time() - last_save > cfg.save_every_minutes * 60:
            save(final=False)
            last_save = time.time()
    bar.close()
    save(final=True)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min, loss {smooth_loss:.4f}")


# -----------------------------------------------------------------------------
# Evaluation: what each sampling schedule gives on the base model. Prompt fidelity (the analytic alignment
# and the classifier reward), the spread of what the caption leaves open (size, position, background), and
# the aesthetic reward. `python toy.py eval` checks the model's targets; `--mechanism` adds every DiffExp
# schedule of the ablations: whether DiffExp's premise (more variety at little cost in fidelity) holds here.

@dataclass
class EvalConfig:
    model: str = os.path.join("weights", "toy")  # diffusers folder of a toy model
    per_caption: int = 4  # samples per caption and setting (x 18 captions)
    num_steps: int = 20  # DDIM steps
    eta: float = 1.0  # DDIM eta (1.0 as DDPO samples; AlignProp samples with 0.0)
    w_high: float = 5.0  # guidance of the DiffExp schedules after t_thres
    mechanism: bool = False  # also DiffExp's schedules: t_thres 900/800/700 x w_low 0/1, and with prompt weighting
    seed: int = 0  # sample i of every setting starts from the same noise
    batch_size: int = 72
    out: str = ""  # if set: OUT/results.json, OUT/table.md and labelled grids of CFG 5 and DiffExp's samples
    threads: int = 2  # torch CPU threads


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


def evaluate(cfg: EvalConfig):
    from plots import grid_labels, save_grid
    from diffusion import Prompt, encode_prompts, encode_text, load_models, sample, timesteps
    from explore import ExploreConfig, explore_batch
    torch.set_num_threads(cfg.threads)
    models = load_models(cfg.model)
    captions = [c for c in all_captions() for _ in range(cfg.per_caption)]
    prompts = [Prompt(c, tuple(c.split()[1:])) for c in captions]  # phrases [colour, shape]
    settings = [("world (training data)", None), ("unconditional", 0.0)] + [(f"CFG {w:g}", w) for w in (1.0, 3.0, 5.0, 7.5)]
    defaults = ExploreConfig(t_thres=T_THRES)
    if cfg.mechanism:  # the paper's t_thres values as they are, then mapped to this schedule by equal noise level
        settings += [(f"w {w_low:g} at t > {t}, then {cfg.w_high:g}", ExploreConfig(t_thres=t, w_low=w_low, prompt_weighting=False))
                     for t in (900, 800, 700, *T_THRES_ABLATIONS) for w_low in (0.0, 1.0)]
        settings.append((f"CFG {cfg.w_high:g} + prompt weighting", ExploreConfig(cfg_schedule=False)))
    settings.append((f"DiffExp (w {defaults.w_low:g} at t > {defaults.t_thres}, then {cfg.w_high:g}; prompt weighting)", defaults))
    ts = timesteps(models, cfg.num_steps)
    uncond = encode_text(models, [""])
    results, grids = {}, {}
    for name, setting in settings:
        t0, chunks = time.time(), []
        for first in range(0, len(prompts), cfg.batch_size):
            batch = prompts[first: first + cfg.batch_size]
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + first)
            if setting is None:
                chunks.append(_world_images(batch, g))
                continue
            cond, positions = encode_prompts(models, batch)
            if isinstance(setting, ExploreConfig):
                cond, guidance, _ = explore_batch(setting, cond, positions, ts, cfg.w_high, 0.0, torch.Generator().manual_seed(first))
            else:
                guidance = setting
            if setting == 0.0:
                cond = uncond.expand(len(batch), -1, -1)  # the unconditional model: no prompt at all
                guidance = 1.0
            with torch.no_grad():
                chunks.append(sample(models, cond, uncond, guidance, cfg.num_steps, cfg.eta, g).images)
        images = torch.cat(chunks)
        row = describe(images, captions)
        row["seconds"] = time.time() - t0
        results[name] = row
        grids[name] = images
        print(f"{name:58s} alignment {row['alignment']:.3f} | classifier {row['toy-classifier']:.2f} | "
              f"aesthetic {row['toy-aesthetic']:.3f} (p90 {row['toy-aesthetic_p90']:.3f}) | layout entropy "
              f"{row['layout_entropy']:.2f} | small {row['small']:.2f} dark {row['dark']:.2f} edge {row['edge']:.2f}", flush=True)
    cfg5, uncond_row = results["CFG 5"]["alignment"], results["unconditional"]["alignment"]
    print(f"targets at {cfg.num_steps} DDIM steps: alignment at CFG 5 {cfg5:.3f} (>= 0.6: {'met' if cfg5 >= 0.6 else 'NOT met'}), "
          f"unconditional {uncond_row:.3f} (<= 0.1: {'met' if uncond_row <= 0.1 else 'NOT met'})")
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump({"config": asdict(cfg), "results": results}, f, indent=1)
        with open(os.path.join(cfg.out, "table.md"), "w") as f:
            f.write(markdown_table(results))
        pick = [i for i in range(len(captions)) if i % cfg.per_caption < 2][:32]  # 2 samples of 16 captions
        for name, file in (("CFG 5", "grid_cfg5.png"), (settings[-1][0], "grid_diffexp.png")):
            images = grids[name][pick]
            labels = grid_labels([captions[i] for i in pick], TOY_REWARDS["toy-aesthetic"]()(images, [captions[i] for i in pick]), "aes")
            save_grid(images, os.path.join(cfg.out, file), labels=labels, title=name)
        print(f"wrote {cfg.out}/results.json, table.md, grid_cfg5.png, grid_diffexp.png")
    return results


def _world_images(prompts, generator):
    """Images of the world for the given captions (the 'data' row of the table): attributes drawn as in
    training, colour and shape set by the caption."""
    a = sample_attributes(len(prompts), generator)
    parsed = torch.tensor([parse_prompt(p.text) for p in prompts])
    a["colour"], a["shape"] = parsed[:, 0], parsed[:, 1]
    a["rgb"] = (COLOUR_RGB[a["colour"]] + COLOUR_JITTER * (2 * torch.rand(len(prompts), 3, generator=generator) - 1)).clamp(0, 1)
    return render(a)


def markdown_table(results: dict) -> str:
    cols = [("alignment", "alignment"), ("toy-classifier", "classifier"), ("toy-classifier_p90", "classifier p90"),
            ("toy-aesthetic", "aesthetic"), ("toy-aesthetic_p90", "aesthetic p90"), ("aesthetic_above_0.6", "aesthetic > 0.6"),
            ("layout_entropy", "layout entropy"),
            ("position_entropy", "position entropy"), ("radius_std", "radius std"), ("small", "small"), ("dark", "dark"),
            ("edge", "off-centre")]
    lines = ["| setting | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# CLI

def cli(args=None):
    import tyro
    return tyro.extras.subcommand_cli_from_dict(
        {"pretrain": PretrainConfig, "train-classifier": ClassifierConfig, "eval": EvalConfig}, args=args)


def main(cfg):
    return {PretrainConfig: pretrain, ClassifierConfig: train_classifier, EvalConfig: evaluate}[type(cfg)](cfg)


if __name__ == "__main__":
    from scaffold import run_cli
    run_cli(main, cli)
