"""
Hand-written LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, W frozen, A and B trained.

    params = inject(unet, rank=4, alpha=4)   # wraps attention to_q/to_k/to_v/to_out.0
    save(unet, "run/checkpoint")             # pytorch_lora_weights.safetensors, diffusers-loadable
    load(unet, "run/checkpoint")             # exact round trip
    merge(unet)                              # fold B A into W for export
    remove(unet)                             # undo inject: the original nn.Linear modules back
    read_settings("run/checkpoint")          # a file's rank, alpha and targets, as inject takes them
    with applied(unet, "run/checkpoint"):    # inject as the file says, load; remove on exit
        ...
    with disabled(unet):                     # the base model's output, LoRA kept (a KL reference)
        ...

The file uses the key names and metadata diffusers reads, so
`StableDiffusionPipeline.load_lora_weights(folder)` (which needs peft installed) loads it too.
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for


class TargetError(ValueError):
    """No layer of the model matches the requested targets (a user's mistake, not a crash)."""


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear. The up-projection B starts at zero, so the model is unchanged at step 0.
    LoRA weights stay in float32 whatever the base's dtype (small updates survive; see the trainers)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and peft do
        nn.init.zeros_(self.lora_B.weight)
        self.merged, self.enabled = False, True

    def forward(self, x):
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale).to(y.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of every wrapped layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 4, alpha: float | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Replaces every nn.Linear whose name ends with one of `targets` by a LoRALinear. Returns the
    trainable parameters (A and B of every wrapped layer, in module order). alpha defaults to rank."""
    alpha = float(rank if alpha is None else alpha)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple("." + t for t in targets))]
    if not names:
        tail = lambda n: ".".join(n.split(".")[-2:] if n.split(".")[-1].isdigit() else n.split(".")[-1:])  # to_out.0
        suffixes = sorted({tail(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TargetError(f"no nn.Linear in {type(model).__name__} has a name ending in one of {list(targets)}; "
                          f"its Linear layers' names end in {suffixes[:12]}{' ...' if len(suffixes) > 12 else ''}.")
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
        torch.manual_seed(seed)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def default_prefix(model: nn.Module) -> str:
    """The key prefix diffusers' load_lora_weights expects for this model: 'transformer' for a diffusion
    transformer (SD3's MMDiT), 'unet' for a UNet."""
    return "transformer" if type(model).__name__.endswith("Transformer2DModel") else "unet"


def state_dict(model: nn.Module, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """LoRA tensors under diffusers' names: '{prefix}.{module}.lora_A.weight' (r, in) / 'lora_B.weight' (out, r);
    prefix: default_prefix(model) unless given."""
    prefix, out = prefix or default_prefix(model), {}
    for name, m in lora_layers(model).items():
        out[f"{prefix}.{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        out[f"{prefix}.{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
    return out


def save(model: nn.Module, folder: str, prefix: str | None = None) -> str:
    """Writes folder/pytorch_lora_weights.safetensors (to a temporary name, then renamed)."""
    prefix, layers = prefix or default_prefix(model), lora_layers(model)
    any_layer = next(iter(layers.values()))
    # peft LoraConfig fields, read by diffusers so that the scale alpha / r is reproduced on load
    config = {"r": any_layer.rank, "lora_alpha": any_layer.alpha, "target_modules": sorted(layers)}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()})}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_NAME)
    save_file(state_dict(model, prefix), path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
    return path


def load(model: nn.Module, path: str, prefix: str | None = None) -> None:
    """Loads a file written by `save` (a folder or the .safetensors path) into an injected model; strict."""
    prefix = prefix or default_prefix(model)
    path = os.path.join(path, WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA weights {path} do not exist.")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RuntimeError(f"LoRA weights {path} are unreadable (truncated or corrupt?): {e}") from e
    ours = state_dict(model, prefix)
    if set(tensors) != set(ours):
        missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
        raise RuntimeError(f"LoRA weights {path} do not match the model: missing {missing[:3]}, unexpected {extra[:3]} "
                           "(was it saved with another rank, target list or base model?).")
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            src = tensors[f"{prefix}.{name}.{part}.weight"]
            dst = getattr(m, part).weight
            if src.shape != dst.shape:
                raise RuntimeError(f"LoRA weights {path}: {name}.{part} has shape {tuple(src.shape)}, "
                                   f"the model expects {tuple(dst.shape)} (another --lora.rank?).")
            with torch.no_grad():
                dst.copy_(src)


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Folds scale * B A into each frozen W (for export / faster inference). Irreversible in low precision."""
    for m in lora_layers(model).values():
        if not m.merged:
            delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scale  # (out, in)
            m.base.weight += delta.to(m.base.weight.dtype)
            m.merged = True


def remove(model: nn.Module) -> None:
    """Undoes inject: every LoRALinear is replaced by the nn.Linear it wraps (the very module object, its
    weights untouched), so the model is the one inject was given. A merged layer's W already holds B A, so a
    model with merged layers is refused (ValueError) before anything changes."""
    layers = lora_layers(model)
    merged = [name for name, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"cannot remove LoRA from merged layers ({merged[0]}, ...): their weights hold B A.")
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside, every (unmerged) LoRA layer returns its frozen base's output alone: the model before fine-tuning,
    bit for bit, without a second copy in memory (the reference policy of a KL penalty). Restored on exit."""
    layers = lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError("cannot disable merged LoRA layers: their weights hold B A.")
    before = {name: m.enabled for name, m in layers.items()}
    for m in layers.values():
        m.enabled = False
    try:
        yield model
    finally:
        for name, m in layers.items():
            m.enabled = before[name]


@dataclass(frozen=True)
class Settings:
    """What inject needs to rebuild the layers of a LoRA file: rank, alpha and the target name suffixes."""
    rank: int
    alpha: float
    targets: tuple[str, ...]


def read_settings(path: str, prefix: str = "unet") -> Settings:
    """The settings of a file written by `save` (a folder or the .safetensors path), from its header only:
    the rank from lora_A's shape (r, in), alpha from the metadata (the rank when a file has none), and the
    targets as the wrapped modules' name suffixes (the last name part, two when it is an index: to_out.0).
    A suffix may match more modules than the file holds; `load` then fails, naming the file. Fails naming
    the file on a missing, unreadable or LoRA-less file."""
    path = os.path.join(path, WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA weights {path} do not exist.")
    try:
        with safe_open(path, framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix + ".") and k.endswith(".lora_A.weight")]
            metadata = f.metadata() or {}
            rank = f.get_slice(keys[0]).get_shape()[0] if keys else None  # lora_A is (rank, in_features)
    except Exception as e:
        raise RuntimeError(f"LoRA weights {path} are unreadable (truncated or corrupt?): {e}") from e
    if not keys:
        raise ValueError(f"LoRA weights {path} hold no LoRA tensors ({prefix}.*.lora_A.weight).")
    alpha = json.loads(metadata.get("lora_adapter_metadata", "{}")).get(f"{prefix}.lora_alpha", rank)
    modules = [k[len(prefix) + 1: -len(".lora_A.weight")].split(".") for k in keys]
    targets = sorted({".".join(m[-2:]) if m[-1].isdigit() else m[-1] for m in modules})
    return Settings(rank, float(alpha), tuple(targets))


@contextlib.contextmanager
def applied(model: nn.Module, path: str, prefix: str = "unet"):
    """Injects LoRA layers shaped as the file says (read_settings), loads the file into them and yields the
    model; on exit, error or not, removes them again (remove), so one base model serves many files."""
    settings = read_settings(path, prefix)
    inject(model, settings.targets, settings.rank, settings.alpha)
    try:
        load(model, path, prefix)
        yield model
    finally:
        remove(model)
