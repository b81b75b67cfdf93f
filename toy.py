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

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# The world

IMAGE_SIZE = 32
GREY = 0.5  # background level of every channel
COLOURS = {  # RGB in [0, 1]; pairwise distances >= 0.42, distance to the grey background >= 0.5
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
SIZE_RANGE = (5.0, 10.0)  # radius of the circle, in pixels; squares and triangles get the same area
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average 4x4 blocks


def caption(colour: int, shape: int) -> str:
    return f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}"


def all_captions() -> list[str]:
    return [caption(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]  # 18


def render(colour: torch.Tensor, shape: torch.Tensor, radius: torch.Tensor, centre: torch.Tensor,
           rgb: torch.Tensor) -> torch.Tensor:
    """Draws one shape per image. colour/shape (n,) indices (colour unused: rgb carries it), radius (n,),
    centre (n, 2) as (x, y) in pixels, rgb (n, 3). Returns images (n, 3, 32, 32) in [0, 1].
    All shapes are axis-aligned and have the area of a circle of `radius` (pi r^2), so size says nothing
    about the shape: square half-side r sqrt(pi)/2, upright isosceles triangle with base = height = r sqrt(2 pi)."""
    S = IMAGE_SIZE * SUPERSAMPLE
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres, in pixels
    X, Y = coords.view(1, 1, S), coords.view(1, S, 1)
    cx, cy, r = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1), radius.view(-1, 1, 1)
    circle = (X - cx) ** 2 + (Y - cy) ** 2 <= r ** 2
    half = r * math.sqrt(math.pi) / 2
    square = ((X - cx).abs() <= half) & ((Y - cy).abs() <= half)
    e = r * math.sqrt(2 * math.pi) / 2  # half of the triangle's base and height; apex at (cx, cy - e)
    triangle = (Y <= cy + e) & ((X - cx).abs() <= (Y - (cy - e)) / 2)
    s = shape.view(-1, 1, 1)
    inside = torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()  # (n, S, S)
    alpha = F.avg_pool2d(inside.unsqueeze(1), SUPERSAMPLE)  # (n, 1, 32, 32) coverage of each pixel
    return GREY * (1 - alpha) + rgb.view(-1, 3, 1, 1) * alpha


def make_batch(n: int, generator: torch.Generator):
    """n random images of the world. Deterministic given the generator's state.
    Returns images (n, 3, 32, 32) float in [0, 1], captions list[str] ("a red circle"), and labels (n, 2)
    long: [colour index, shape index]. The prompt phrases of a caption are [colour, shape]."""
    g = generator
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    lo, hi = SIZE_RANGE
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    extent = radius * math.sqrt(2 * math.pi) / 2 + 1  # the widest shape's half-extent (the triangle) + 1 px margin
    centre = extent.unsqueeze(1) + (IMAGE_SIZE - 2 * extent).unsqueeze(1) * torch.rand(n, 2, generator=g)  # (n, 2)
    rgb = (COLOUR_RGB[colour] + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=g) - 1)).clamp(0, 1)
    images = render(colour, shape, radius, centre, rgb)
    captions = [caption(c, s) for c, s in zip(colour.tolist(), shape.tolist())]
    return images, captions, torch.stack([colour, shape], 1)


def parse_prompt(prompt: str) -> tuple[int, int]:
    """'a red circle' (or 'a [red] [circle]') -> (colour index, shape index)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOURS), None)
    shape = next((SHAPES.index(w) for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(f"toy rewards need prompts of the form 'a {{colour}} {{shape}}' with colour in "
                         f"{COLOUR_NAMES} and shape in {SHAPES}; got {prompt!r}.")
    return colour, shape


def _targets(prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = torch.tensor([parse_prompt(p) for p in prompts], device=device)  # (B, 2)
    return parsed[:, 0], parsed[:, 1]


# -----------------------------------------------------------------------------
# Analytic rewards. They read the world's rules straight off the pixels: the object is the largest region
# of pixels far enough from the grey background; its colour is the mean of its interior; its shape is
# whichever ideal shape, fitted to the object's bounding box, overlaps it best.

FOREGROUND = 0.25  # a pixel is foreground when its RGB distance to the grey background exceeds this
COLOUR_SIGMA = 0.15  # colour match = exp(-d^2 / (2 sigma^2)), d = RGB distance to the prompted colour
SHAPE_TEMPERATURE = 0.03  # softmax temperature over the 3 shapes' IoUs
MIN_AREA = 9  # pixels; a smaller object (or none) scores 0


def object_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the largest 8-connected region of pixels far from the grey background. Taking the
    largest region makes isolated specks of noise (common in half-trained samples) not count as the object."""
    fg = ((images.float() - GREY).norm(dim=1) > FOREGROUND).unsqueeze(1)  # (B, 1, H, W)
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


def toy_aesthetic(device="cpu", dtype=torch.float32, tiny=False, weights=None):
    """A prompt-free analogue of the aesthetic score, in [0, 1], differentiable: big (a quarter of the
    image is ideal: exp(-((a - 0.25) / 0.15)^2)), centred (exp(-(offset / 0.25)^2), offset in image widths)
    and vivid (the object's mean distance from grey, / 0.7). Uses a soft foreground mask."""
    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.float()
        dist = (x - GREY).norm(dim=1)  # (B, H, W)
        m = ((dist - 0.1) / 0.2).clamp(0, 1)  # soft foreground mask
        area = m.mean((1, 2))  # fraction of the image
        H, W = m.shape[1:]
        ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H - 0.5
        xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W - 0.5
        mass = m.sum((1, 2)).clamp(min=1e-6)
        offset = torch.stack([(m * ys.view(1, H, 1)).sum((1, 2)), (m * xs.view(1, 1, W)).sum((1, 2))], 1) / mass[:, None]
        vivid = ((m * dist).sum((1, 2)) / mass / 0.7).clamp(max=1)
        size = torch.exp(-((area - 0.25) / 0.15) ** 2)
        centred = torch.exp(-(offset.norm(dim=1) / 0.25) ** 2)
        return (size * centred * vivid).float()
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
        h = self.features((images - GREY) / 0.25).mean((2, 3))  # (B, 4 * width), global average pool
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
            raise FileNotFoundError(f"toy-classifier: no weights at {path}; train them with `python toy.py train-classifier`.")
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

# A pixel-space UNet for 32x32 images: 32 -> 16 -> 8, cross-attention to the prompt only at 8x8 (the
# attention blocks are where LoRA goes; at 8x8 they are cheap). ~1 M parameters.
TOY_UNET = dict(
    sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
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
TOY_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


@dataclass
class PretrainConfig:
    out: str = os.path.join("weights", "toy")  # diffusers folder: unet/ text_encoder/ tokenizer/ scheduler/ (no vae/)
    minutes: float = 25.0  # wall-clock budget; training stops at this or at max_steps, whichever comes first
    max_steps: int = 0  # optimizer steps (0 = only the time budget)
    batch_size: int = 32  # fresh world images per step
    lr: float = 1e-3  # AdamW peak learning rate; linear warm-up, then cosine decay to lr / 10 over the budget
    warmup_steps: int = 100  # linear learning-rate warm-up, in optimizer steps
    weight_decay: float = 0.0  # AdamW weight decay
    caption_dropout: float = 0.15  # fraction of captions replaced by "" (the unconditional prompt for CFG)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): weight min(SNR, gamma) / SNR; 0 = off
    ema_decay: float = 0.999  # EMA of the weights (what gets saved); effective decay min(this, (1+k)/(10+k))
    save_every_minutes: float = 5.0  # also write the EMA weights during training, so an interrupted run leaves a model
    seed: int = 0  # init and data seed
    init: str = ""  # start from the weights of this toy model folder instead of random ones (train longer)
    threads: int = 2  # torch CPU threads
    device: str = "cpu"  # "cuda" works too: the same code, much faster


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
    """Writes the diffusers folder to a temporary name, then swaps it in. The text encoder is stored in fp16:
    its 49408 x 32 token table is 6 MB in fp32, and fp16 rounding (5e-4 relative) is far below what
    matters here. The UNet (~1 M parameters) stays fp32. Loaders cast to their own dtype."""
    import copy
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
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
    device = torch.device(cfg.device)
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
    budget = cfg.minutes * 60
    start = last_save = time.time()
    step, smooth_loss = 0, None

    def progress():
        p = (time.time() - start) / budget
        return max(p, step / cfg.max_steps) if cfg.max_steps else p

    def save(final: bool):
        live = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):  # save the EMA weights, then put the live ones back
            p.data.copy_(e)
        info = dict(config=asdict(cfg), steps=step, minutes=(time.time() - start) / 60,
                    loss=smooth_loss, final=final, init=init_info)
        save_toy_model(cfg.out, unet, text_encoder, tokenizer, scheduler, info)
        for p, l in zip(params, live):
            p.data.copy_(l)
        tqdm.write(f"saved EMA weights to {cfg.out} (step {step})")

    bar = tqdm(total=cfg.max_steps or None, desc="pretrain", mininterval=10)
    while progress() < 1:
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
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress(), 1.0))))
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
        if step % 50 == 0:
            tqdm.write(f"step {step} | loss {smooth_loss:.4f} | lr {lr:.2e} | {(time.time() - start) / step:.2f} s/step")
        if time.time() - last_save > cfg.save_every_minutes * 60:
            save(final=False)
            last_save = time.time()
    bar.close()
    save(final=True)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min, loss {smooth_loss:.4f}")


# -----------------------------------------------------------------------------
# Evaluation: the alignment reward of the shipped model without guidance, with CFG, with DiffExp's schedule.

@dataclass
class EvalConfig:
    model: str = os.path.join("weights", "toy")  # diffusers folder of a toy model
    num_images: int = 32  # per setting; prompts cycle through the 18 captions
    num_steps: int = 20  # DDIM steps
    eta: float = 1.0  # DDIM eta (1.0 as DDPO samples)
    scales: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0, 7.5)  # CFG scales; 0 = unconditional
    diffexp_w_high: float = 5.0  # also evaluate DiffExp's schedule: w_low (1.0) above t_thres (800), then this
    seed: int = 0  # the same initial noise for every setting
    grid: str = ""  # if set, a PNG of the CFG-5 samples
    threads: int = 2  # torch CPU threads


def sample_toy(models, prompts: list[str], guidance, num_steps: int = 20, eta: float = 1.0, seed: int = 0):
    """Images (B, 3, 32, 32) in [0, 1] for prompts, through diffusion.py. guidance: float or (B, T)."""
    from diffusion import encode_text, sample
    cond = encode_text(models, prompts)  # (B, 77, D)
    uncond = encode_text(models, [""])  # (1, 77, D)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sample(models, cond, uncond, guidance, num_steps=num_steps, eta=eta, generator=g).images


def evaluate(cfg: EvalConfig):
    from diffusion import load_models, timesteps
    from explore import ExploreConfig, guidance_scales
    torch.set_num_threads(cfg.threads)
    models = load_models(cfg.model)
    prompts = [all_captions()[i % 18] for i in range(cfg.num_images)]
    clf = toy_classifier() if os.path.isfile(CLASSIFIER_PATH) else None
    explore_cfg = ExploreConfig()
    settings = [(f"CFG {w:g}" if w else "unconditional", w) for w in cfg.scales]
    ts = timesteps(models, cfg.num_steps)
    settings.append((f"DiffExp (w {explore_cfg.w_low:g} at t > {explore_cfg.t_thres}, then {cfg.diffexp_w_high:g})",
                     guidance_scales(ts, len(prompts), cfg.diffexp_w_high, explore_cfg, schedule_on=True)))
    results = {}
    for name, guidance in settings:
        t0 = time.time()
        images = sample_toy(models, prompts, guidance, cfg.num_steps, cfg.eta, cfg.seed)
        parts = alignment_scores(images, prompts)
        # diversity: mean pairwise pixel distance between images of the same prompt (higher = more varied)
        x = images.flatten(1)
        same = torch.tensor([[p == q for q in prompts] for p in prompts]) & ~torch.eye(len(prompts), dtype=torch.bool)
        diversity = torch.cdist(x, x)[same].mean().item() if same.any() else float("nan")
        row = dict(alignment=parts["alignment"].mean().item(), colour=parts["colour"].mean().item(),
                   shape=parts["shape"].mean().item(), diversity=diversity, seconds=time.time() - t0)
        if clf is not None:
            row["classifier"] = clf(images, prompts).mean().item()
        results[name] = row
        print(f"{name:48s} alignment {row['alignment']:.3f} (colour {row['colour']:.2f}, shape {row['shape']:.2f})"
              + (f" | classifier {row['classifier']:.2f}" if clf else "") + f" | diversity {diversity:.2f} | {row['seconds']:.1f} s")
        if cfg.grid and name == "CFG 5":
            from common import save_grid
            save_grid(images, cfg.grid)
    return results


# -----------------------------------------------------------------------------
# CLI

if __name__ == "__main__":
    import tyro
    cfg = tyro.extras.subcommand_cli_from_dict(
        {"pretrain": PretrainConfig, "train-classifier": ClassifierConfig, "eval": EvalConfig})
    {PretrainConfig: pretrain, ClassifierConfig: train_classifier, EvalConfig: evaluate}[type(cfg)](cfg)
