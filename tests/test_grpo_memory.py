"""experiments/grpo_memory.py: the saved-for-backward count against a hand count on one LoRA layer, and the
fake-tensor trace against the same count on the real tiny SD3 (same weights' bytes, same activations)."""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import flow  # noqa: E402
import grpo_memory  # noqa: E402
import lora  # noqa: E402
import train_grpo  # noqa: E402


def test_saved_bytes_is_what_a_lora_layer_keeps_for_backward():
    """A frozen Linear(16, 32) with LoRA rank 3 on 10 rows, float32: backward needs the input (for A's
    gradient) and A's output (for B's); the frozen and LoRA weights are parameters, not counted."""
    layer = torch.nn.Linear(16, 32).requires_grad_(False)
    wrapped = torch.nn.Sequential(torch.nn.Sequential(layer))  # the layer's name: "0.0"
    lora.inject(wrapped, targets=("0",), rank=3)
    x = torch.randn(10, 16)
    assert grpo_memory.saved_bytes(wrapped, {"input": x}, torch.float32) == (10 * 16 + 10 * 3) * 4


def test_the_fake_trace_counts_what_the_real_tiny_sd3_keeps():
    cfg = train_grpo.PRESETS["tiny-sd3"][1]
    parts = grpo_memory.estimate(cfg, torch.bfloat16)
    models = flow.load_flow_models("tiny-sd3", dtype=torch.bfloat16)
    assert parts["text encoders"] * grpo_memory.GIB == sum(
        p.numel() * 2 for m in models.text_encoders for p in m.parameters())
    assert parts["vae"] * grpo_memory.GIB == sum(p.numel() * 4 for p in models.vae.parameters())
    params = lora.inject(models.transformer, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
    assert parts["lora, gradient, Adam"] * grpo_memory.GIB == 4 * 4 * sum(p.numel() for p in params)
    rows = parts["rows"]
    assert rows == 2 * cfg.train.batch_size  # CFG doubles the transformer's rows
    states, pooled = flow.encode_text(dataclasses.replace(models, t5_length=flow.TINY_T5_LENGTH), ["a cat"] * rows)
    inputs = dict(hidden_states=torch.randn(rows, *models.latent_shape, dtype=torch.bfloat16),
                  timestep=torch.full((rows,), 500.0), encoder_hidden_states=states, pooled_projections=pooled,
                  return_dict=False)
    real = grpo_memory.saved_bytes(models.transformer, inputs, torch.bfloat16)
    assert real > 0 and parts["activations"] * grpo_memory.GIB == real
