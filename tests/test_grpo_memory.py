"""experiments/grpo_memory.py: the saved-for-backward count against hand counts on one LoRA layer (float32,
and under CUDA's bf16 autocast rules on fake CUDA tensors), and the fake trace against the same count on the
real tiny SD3 (the same weights' bytes, the same activations)."""

import dataclasses
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import flow  # noqa: E402
import grpo_memory  # noqa: E402
import lora  # noqa: E402
import train_grpo  # noqa: E402


def lora_layer():
    """A frozen Linear(16, 32) in float32 with LoRA rank 3, named "0.0"."""
    wrapped = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(16, 32).requires_grad_(False)))
    lora.inject(wrapped, targets=("0",), rank=3)
    return wrapped


def test_saved_bytes_is_what_a_lora_layer_keeps_for_backward():
    """10 rows in float32: backward keeps the input (for A's gradient) and A's output (for B's); the frozen
    and LoRA weights are parameters, not counted."""
    assert grpo_memory.saved_bytes(lora_layer(), {"input": torch.randn(10, 16)}) == (10 * 16 + 10 * 3) * 4


def test_cuda_autocast_rules_apply_without_a_gpu():
    """Under CUDA's bf16 autocast each matmul casts its operands to bf16, and backward keeps the casts: the
    input's (for A's gradient), A's output (for B's) and B's weight (for the gradient into A's output)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        layer = lora_layer()
        x = torch.empty(10, 16)
        assert grpo_memory.saved_bytes(layer, {"input": x}, torch.bfloat16) == (10 * 16 + 10 * 3 + 32 * 3) * 2
        with grpo_memory.gpu_rules(torch.bfloat16):
            assert torch.nn.functional.layer_norm(x.bfloat16(), (16,)).dtype == torch.float32  # CUDA's rule
    assert not torch.is_autocast_enabled("cuda")


def test_the_fake_trace_counts_what_the_real_tiny_sd3_keeps():
    """The same float32 step traced on fake CUDA tensors and run for real on the CPU keeps the same bytes."""
    cfg = train_grpo.PRESETS["tiny-sd3"][1]
    parts = grpo_memory.estimate(cfg, torch.float32)
    models = flow.load_flow_models("tiny-sd3")
    assert parts["text encoders"] * grpo_memory.GIB == sum(
        p.numel() * 4 for m in models.text_encoders for p in m.parameters())
    assert parts["vae"] * grpo_memory.GIB == sum(p.numel() * 4 for p in models.vae.parameters())
    params = lora.inject(models.transformer, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    assert parts["lora, gradient, Adam"] * grpo_memory.GIB == 4 * 4 * sum(p.numel() for p in params)
    rows = parts["rows"]
    assert rows == 2 * cfg.train.batch_size  # CFG doubles the transformer's rows
    states, pooled = flow.encode_text(dataclasses.replace(models, t5_length=flow.TINY_T5_LENGTH), ["a cat"] * rows)
    inputs = dict(hidden_states=torch.randn(rows, *models.latent_shape), timestep=torch.full((rows,), 500.0),
                  encoder_hidden_states=states, pooled_projections=pooled, return_dict=False)
    real = grpo_memory.saved_bytes(models.transformer, inputs)
    assert real > 0 and parts["activations"] * grpo_memory.GIB == real
