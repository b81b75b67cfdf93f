"""--compile: the trainer wraps the UNet in torch.compile, trains through it, and saves checkpoints from
the uncompiled module, so their LoRA keys carry no `_orig_mod.` and load into a plain UNet.

torch.compile's default backend, inductor, generates C++ for the UNet's forward and backward: about 6
minutes for this one tiny epoch on a 2-core CPU. The test therefore swaps in the "aot_eager" backend
(about 45 s): dynamo traces the same graphs and AOTAutograd builds the same joint forward / backward,
only the code generation is skipped. The trainer's own code path (wrapping, shared parameters,
gradient checkpointing through the compiled module, saving) is exactly the one a GPU run takes."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

import scaffold
import lora
import train_alignprop
from test_alignprop import small


@pytest.mark.slow
def test_compile_trains_and_saves_uncompiled_keys(tmp_path, monkeypatch, tiny):
    from torch._dynamo.backends.registry import lookup_backend
    real_compile, compiled, graphs = torch.compile, [], []

    def backend(gm, example_inputs):  # counts the graphs dynamo hands over, then runs them with aot_eager
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def spy(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend=backend)

    monkeypatch.setattr(torch, "compile", spy)
    run = train_alignprop.main(small(tmp_path / "compiled", compile=True))
    monkeypatch.undo()
    assert len(compiled) == 1 and lora.lora_layers(compiled[0]) and graphs  # the LoRA-injected UNet, really traced

    weights = load_file(os.path.join(scaffold.latest_checkpoint(run), lora.WEIGHT_NAME))
    assert weights and not any("_orig_mod" in k for k in weights)
    fresh = copy.deepcopy(tiny.unet)  # uncompiled
    lora.inject(fresh, rank=4, seed=1)
    lora.load(fresh, scaffold.latest_checkpoint(run))  # strict: the same keys and shapes
    assert all(torch.equal(weights[k], v) for k, v in lora.state_dict(fresh).items())

    plain = train_alignprop.main(small(tmp_path / "plain"))  # the same run without compile
    (a,), (b,) = (scaffold.read_metrics(os.path.join(r, "metrics.jsonl")) for r in (run, plain))
    assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-5
    expected = load_file(os.path.join(scaffold.latest_checkpoint(plain), lora.WEIGHT_NAME))
    for k in expected:
        torch.testing.assert_close(weights[k], expected[k], rtol=1e-3, atol=1e-6)
