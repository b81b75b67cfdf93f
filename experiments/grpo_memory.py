"""
How much GPU memory one training step of train_grpo.py needs on a flow model, counted on a CPU without
allocating it: an estimate for sizing --train.batch-size before a GPU run (bench_gpu.py's grpo part
measures the real peak).

- weights: every model's parameters in the compute dtype (the VAE in float32, as flow.load_flow_models
  keeps it), and LoRA in float32 with its gradient and Adam's two moments;
- activations: the tensors autograd keeps for the backward pass of one re-scored step of a micro-batch
  (train_grpo.grpo_epoch; with CFG the transformer runs 2 x --train.batch-size rows), traced on fake CUDA
  tensors (shapes, dtypes and a device, no storage, no compute, no GPU) under CUDA's own autocast rules
  (bf16 matmuls; layer norms, softmax, pow in float32), each storage counted once, the weights' own not
  again. Attention keeps what flash attention keeps (q, k, v, its output and a float32 log-sum-exp): the
  kernel a GPU picks for bf16 and heads of 64;
- the rollout buffer: an epoch's latents (float32) and prompt states.

Not counted: the reward model (PickScore's ViT-H/14: about 2 GB in bf16), the backward pass's transient
buffers, CUDA's workspaces and the allocator's fragmentation. The model name maps to its architecture
(sd35m: sd35m-random's); weights are never read.

    python experiments/grpo_memory.py sd35m-pickscore                          # the one-GPU preset
    python experiments/grpo_memory.py sd35m-pickscore --train.batch-size 4     # any train_grpo flag
"""

import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import flow  # noqa: E402
import lora  # noqa: E402
import train_grpo  # noqa: E402

GIB = 2 ** 30


def fake_models(name: str, dtype: torch.dtype) -> tuple[dict, FakeTensorMode]:
    """{transformer, vae, text encoders, t5_length}: the architecture's modules with fake CUDA parameters in
    `dtype`, and its default T5 length."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    arch = "sd35m-random" if name == "sd35m" else name
    if arch not in flow.RANDOM_ARCHITECTURES:
        known = ", ".join(flow.RANDOM_ARCHITECTURES)
        raise common.ConfigError(f"--model {name}: this estimate knows {known} and sd35m.")
    transformer, vae, clip_l, clip_g, t5, t5_length = flow.RANDOM_ARCHITECTURES[arch]
    mode, default = FakeTensorMode(allow_non_fake_inputs=True), torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mode, torch.device("cuda"):  # frozen, as load_flow_models leaves them: autograd keeps what LoRA needs
            return {"transformer": SD3Transformer2DModel(**transformer).requires_grad_(False),
                    "vae": AutoencoderKL(**vae),
                    "text encoders": [CLIPTextModelWithProjection(CLIPTextConfig(**clip_l)),
                                      CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
                                      T5EncoderModel(T5Config(**t5))], "t5_length": t5_length}, mode
    finally:
        torch.set_default_dtype(default)


def nbytes(module: torch.nn.Module, dtype=None) -> int:
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in module.parameters())


class FlashAttention(torch.autograd.Function):
    """Shapes only: the output, and for backward what flash attention keeps (q, k, v, output, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def gpu_rules(dtype: torch.dtype):
    """CUDA's autocast to `dtype` (off for float32) and flash attention, on fake CUDA tensors and without a GPU:
    torch.autocast("cuda") declines where CUDA is not available; the dispatcher's own switch does not ask."""
    attention = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: FlashAttention.apply(q, k, v)
    on, before = dtype != torch.float32, torch.get_autocast_dtype("cuda")
    if on:
        torch.set_autocast_dtype("cuda", dtype)
        torch.set_autocast_enabled("cuda", True)
        torch.autocast_increment_nesting()
    try:
        yield
    finally:
        F.scaled_dot_product_attention = attention
        if on:
            torch.autocast_decrement_nesting()
            torch.clear_autocast_cache()
            torch.set_autocast_enabled("cuda", False)
            torch.set_autocast_dtype("cuda", before)


def saved_bytes(module: torch.nn.Module, inputs: dict, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the distinct storages autograd saves for backward in module(**inputs) under gpu_rules(dtype),
    the module's own parameters and buffers left out."""
    seen = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage()._cdata
        if key not in seen:  # every saved tensor stays alive until backward, so keys are not reused
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), gpu_rules(dtype):
        module(**inputs)
    return total


def estimate(cfg: train_grpo.Config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """-> GiB per part for cfg's micro-batch of one step, and the rows the transformer runs."""
    models, mode = fake_models(cfg.model, dtype)
    s, transformer = cfg.sample, models["transformer"]
    with mode, torch.device("cuda"):
        params = lora.inject(transformer, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    rows = cfg.train.batch_size * (2 if s.guidance_scale != 1 else 1)
    c = transformer.config.in_channels
    side = (s.resolution // 2 ** (len(models["vae"].config.block_out_channels) - 1) if s.resolution
            else transformer.config.sample_size)
    tokens = flow.CLIP_LENGTH + (s.max_sequence_length or models["t5_length"])
    width = transformer.config.joint_attention_dim
    with mode, torch.device("cuda"):
        inputs = dict(hidden_states=torch.empty(rows, c, side, side, dtype=dtype), timestep=torch.zeros(rows),
                      encoder_hidden_states=torch.empty(rows, tokens, width, dtype=dtype),
                      pooled_projections=torch.empty(rows, transformer.config.pooled_projection_dim,
                                                     dtype=dtype), return_dict=False)
        activations = saved_bytes(transformer, inputs, dtype)
    n = s.group_size * s.prompts_per_batch * s.num_batches
    lora_bytes = sum(p.numel() for p in params) * 4
    return {"rows": rows,
            "transformer": (nbytes(transformer) - lora_bytes) / GIB,
            "text encoders": sum(nbytes(m) for m in models["text encoders"]) / GIB,
            "vae": nbytes(models["vae"], torch.float32) / GIB,
            "lora, gradient, Adam": 4 * lora_bytes / GIB,
            "rollout buffer": n * ((s.num_steps + 1) * c * side * side * 4 + tokens * width * dtype.itemsize) / GIB,
            "activations": activations / GIB}


def main(args=None):
    cfg = train_grpo.cli(args)
    try:
        parts = estimate(cfg)
    except common.ConfigError as e:
        raise SystemExit(f"error: {e}")
    rows = parts.pop("rows")
    print(f"{cfg.name}: {cfg.model} at {cfg.sample.resolution or 'native'} px, micro-batch "
          f"{cfg.train.batch_size} ({rows} transformer rows), LoRA rank {cfg.lora.rank}, bf16")
    for name, gib in parts.items():
        print(f"  {name:22s} {gib:7.2f} GiB")
    print(f"  {'total':22s} {sum(parts.values()):7.2f} GiB, before the reward model and the backward pass's "
          "transient buffers")
    return parts


if __name__ == "__main__":
    main()
