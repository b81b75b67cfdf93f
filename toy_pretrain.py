"""
Pretraining the toy model, training the toy classifier reward's CNN, and measuring sampling schedules on
the model: everything of the toy world (toy.py) that trains or samples a model.

    python toy_pretrain.py pretrain --out weights/toy    # 4500 steps of 64 fresh world images (weights/toy/training_info.json)
    python toy_pretrain.py train-classifier              # weights/toy_classifier.safetensors (0.5 MB)
    python toy_pretrain.py eval                          # alignment, rewards, layout spread: CFG vs DiffExp's schedule
    python toy_pretrain.py eval --mechanism              # and every DiffExp ablation (experiments.md, section 6.2)

The model is a diffusers folder without vae/ (sampled in pixel space, with x0 clipping: TOY_SCHEDULER);
fine-tune it with the trainers' toy presets (`python train_alignprop.py toy`, docs/toy-world.md).

Sections: training the classifier | pretraining (model, schedule, DiffExp's threshold on it) | evaluation | CLI.
"""

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common
from toy import IMAGE_SIZE, TOY_REWARDS, ToyClassifier, all_captions, describe, make_batch, world_images

# -----------------------------------------------------------------------------
# Training the classifier reward's CNN (toy.ToyClassifier) on fresh world images.

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
# the aesthetic reward. `python toy_pretrain.py eval` checks the model's targets; `--mechanism` adds every DiffExp
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
                chunks.append(world_images([p.text for p in batch], g))
                continue
            cond, positions = encode_prompts(models, batch)
            if isinstance(setting, ExploreConfig):
                cond, guidance = explore_batch(setting, cond, positions, ts, cfg.w_high, 0.0, torch.Generator().manual_seed(first))
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
