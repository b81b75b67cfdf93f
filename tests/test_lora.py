"""Tests for lora.py: the LoRA formula, injection, save / load round trip, diffusers compatibility, merge,
remove (undoing inject), reading a file's settings and applying a file for a while."""

import copy
import os

import pytest
import torch
import torch.nn as nn

import lora


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def unet_out(unet, seed=0):
    x, t, c = randn(2, 4, 16, 16, seed=seed), torch.tensor([700, 30]), randn(2, 77, 32, seed=seed + 1)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


class Block(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.to_q = nn.Linear(8, 6).to(dtype)
        self.other = nn.Linear(8, 8).to(dtype)


def test_formula_and_dtypes():
    """y = W x + b + (alpha / r) B A x; LoRA weights stay float32 on a bfloat16 base, output keeps its dtype."""
    model = nn.Sequential(Block(torch.bfloat16))
    base = copy.deepcopy(model[0].to_q)
    A, B = lora.inject(model, targets=("to_q",), rank=2, alpha=6)
    assert isinstance(model[0].to_q, lora.LoRALinear) and isinstance(model[0].other, nn.Linear)
    assert A.dtype == B.dtype == torch.float32 and A.shape == (2, 8) and B.shape == (6, 2)
    with torch.no_grad():
        B.copy_(randn(6, 2))
    x = randn(5, 8, seed=1).bfloat16()
    y = model[0].to_q(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + 3.0 * (x.float() @ A.T @ B.T)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_zero_init_leaves_unet_unchanged(tiny):
    """Right after inject (B = 0) the UNet's output is exactly the base model's."""
    unet = copy.deepcopy(tiny.unet)
    params = lora.inject(unet, rank=4)
    assert all(torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight)) for m in lora.lora_layers(unet).values())
    assert params[0].abs().sum() > 0  # A is random, so B = 0 is what keeps the output unchanged
    assert torch.equal(unet_out(unet), unet_out(tiny.unet))


def test_inject_returns_exactly_the_trainable_params(tiny):
    """inject wraps every attention q/k/v/out Linear and returns their A, B (in module order), the only trainables."""
    targets = [n for n, m in tiny.unet.named_modules()
               if isinstance(m, nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    unet = copy.deepcopy(tiny.unet)
    state = torch.get_rng_state()
    params = lora.inject(unet, rank=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # seeded without touching the global RNG
    layers = lora.lora_layers(unet)
    assert sorted(layers) == sorted(targets) and len(targets) > 0
    expected = [p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    assert len(params) == len(expected) == 2 * len(targets)
    assert all(p is q for p, q in zip(params, expected))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} and len(trainable) == len(params)
    again = lora.inject(copy.deepcopy(tiny.unet), rank=4, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(params, again))  # the seed fixes the init
    assert all(m.scale == 1.0 for m in layers.values())  # alpha defaults to rank
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.inject(copy.deepcopy(tiny.unet), targets=("no_such_layer",))


def test_save_load_round_trip(lora_models, tmp_path):
    """save, then load into a freshly injected model (other init): every tensor equal, same output."""
    models, params = lora_models(rank=4, alpha=8)
    path = lora.save(models.unet, str(tmp_path))
    assert os.path.basename(path) == lora.WEIGHT_NAME and os.listdir(tmp_path) == [lora.WEIGHT_NAME]
    fresh, fresh_params = lora_models(rank=4, alpha=8, seed=7)
    assert not torch.equal(fresh_params[0], params[0])
    lora.load(fresh.unet, str(tmp_path))
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params))
    assert torch.equal(unet_out(fresh.unet), unet_out(models.unet))
    lora.load(fresh.unet, path)  # the file path works as well as its folder


def test_diffusers_load_lora_weights(lora_models, tiny, tiny_folder, tmp_path):
    """diffusers' StableDiffusionPipeline.load_lora_weights reads our file and reproduces our UNet output,
    with alpha != rank so that the scale alpha / r is checked."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    models, _ = lora_models(rank=4, alpha=8)
    lora.save(models.unet, str(tmp_path / "lora"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(unet_out(pipe.unet), unet_out(tiny.unet))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ours = unet_out(models.unet)
    torch.testing.assert_close(unet_out(pipe.unet), ours, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, unet_out(tiny.unet), atol=1e-3)  # LoRA changes the output


def test_merge_equals_unmerged(lora_models):
    """merge folds scale * B A into W: same output; merging twice is a no-op."""
    models, _ = lora_models(rank=4, alpha=8)
    before = unet_out(models.unet)
    lora.merge(models.unet)
    assert all(m.merged for m in lora.lora_layers(models.unet).values())
    torch.testing.assert_close(unet_out(models.unet), before, rtol=0, atol=1e-5)
    lora.merge(models.unet)
    torch.testing.assert_close(unet_out(models.unet), before, rtol=0, atol=1e-5)


def test_load_errors(lora_models, tmp_path):
    """Another rank, other targets, a corrupt or truncated file, a missing file: clear errors naming the file."""
    models, _ = lora_models(rank=4)
    other_rank, _ = lora_models(rank=2)
    path = lora.save(other_rank.unet, str(tmp_path / "rank2"))
    with pytest.raises(RuntimeError, match="rank") as e:
        lora.load(models.unet, path)
    assert path in str(e.value)

    q_only = copy.deepcopy(models.unet)
    for name, layer in lora.lora_layers(q_only).items():  # undo the LoRA on all but to_q
        if not name.endswith("to_q"):
            parent, _, child = name.rpartition(".")
            setattr(q_only.get_submodule(parent), child, layer.base)
    path = lora.save(q_only, str(tmp_path / "q_only"))
    with pytest.raises(RuntimeError, match="do not match") as e:
        lora.load(models.unet, path)
    assert path in str(e.value)

    good = lora.save(models.unet, str(tmp_path / "good"))
    data = open(good, "rb").read()
    for name, content in (("truncated", data[: len(data) // 2]), ("corrupt", b"not a safetensors file" * 10)):
        bad = tmp_path / name / lora.WEIGHT_NAME
        bad.parent.mkdir()
        bad.write_bytes(content)
        with pytest.raises(RuntimeError) as e:
            lora.load(models.unet, str(bad.parent))
        assert str(bad) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        lora.load(models.unet, str(tmp_path / "missing"))


def test_remove_restores_the_original_modules_and_outputs(tiny):
    """remove puts back the very nn.Linear objects inject wrapped (weights untouched): the same modules, the
    same output as before inject; a model without LoRA is left as it is; merged layers are refused."""
    unet = copy.deepcopy(tiny.unet)
    before = dict(unet.named_modules())
    expected = unet_out(unet)
    lora.inject(unet, rank=4)
    for layer in lora.lora_layers(unet).values():
        with torch.no_grad():
            layer.lora_B.weight.fill_(0.1)  # the LoRA changes the output while it is in
    assert not torch.allclose(unet_out(unet), expected, atol=1e-3)
    lora.remove(unet)
    assert not lora.lora_layers(unet)
    after = dict(unet.named_modules())
    assert after.keys() == before.keys() and all(after[n] is m for n, m in before.items())
    assert torch.equal(unet_out(unet), expected)
    lora.remove(unet)  # nothing to remove
    assert dict(unet.named_modules()).keys() == before.keys()

    lora.inject(unet, rank=4)
    lora.merge(unet)
    with pytest.raises(ValueError, match="merged"):
        lora.remove(unet)
    assert lora.lora_layers(unet)  # refused before anything changed


@pytest.mark.parametrize("targets, rank, alpha", [(lora.DEFAULT_TARGETS, 4, None),
                                                  (("to_q", "to_out.0"), 2, 6)])
def test_read_settings_returns_what_inject_and_save_wrote(tiny, tmp_path, targets, rank, alpha):
    unet = copy.deepcopy(tiny.unet)
    lora.inject(unet, targets, rank, alpha)
    path = lora.save(unet, str(tmp_path))
    settings = lora.read_settings(str(tmp_path))
    assert settings == lora.Settings(rank=rank, alpha=float(rank if alpha is None else alpha),
                                     targets=tuple(sorted(targets)))
    assert lora.read_settings(path) == settings  # the file as well as its folder
    again = copy.deepcopy(tiny.unet)
    lora.inject(again, settings.targets, settings.rank, settings.alpha)
    lora.load(again, path)  # strict: the settings rebuild exactly the saved layers
    assert sorted(lora.lora_layers(again)) == sorted(lora.lora_layers(unet))


def test_read_settings_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(FileNotFoundError, match="missing"):
        lora.read_settings(str(tmp_path / "missing"))
    other = str(tmp_path / "other.safetensors")
    save_file({"unet.x.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.safetensors hold no LoRA tensors"):
        lora.read_settings(other)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(RuntimeError, match="corrupt.safetensors are unreadable"):
        lora.read_settings(str(corrupt))


def test_applied_loads_a_file_for_a_while_and_removes_it(lora_models, tiny, tmp_path):
    """Inside `applied` the model computes what the saved model computed; after it, error or not, the model
    holds its original modules again."""
    models, _ = lora_models(rank=2, alpha=6)
    path = lora.save(models.unet, str(tmp_path))
    unet = copy.deepcopy(tiny.unet)
    before = dict(unet.named_modules())
    with lora.applied(unet, path) as same:
        assert same is unet and len(lora.lora_layers(unet)) == len(lora.lora_layers(models.unet))
        assert torch.equal(unet_out(unet), unet_out(models.unet))
    assert all(dict(unet.named_modules())[n] is m for n, m in before.items()) and not lora.lora_layers(unet)
    assert torch.equal(unet_out(unet), unet_out(tiny.unet))
    with pytest.raises(KeyError):
        with lora.applied(unet, path):
            raise KeyError("an error inside")
    assert not lora.lora_layers(unet)


def test_disabled_gives_the_base_output_exactly_and_restores(lora_models, tiny):
    """lora.disabled: the base model's output bit for bit (the KL reference without a second copy), and the
    LoRA output back on exit, also after an error; merged layers are refused."""
    models, params = lora_models(rank=4, alpha=8)
    with_lora = unet_out(models.unet)
    assert not torch.allclose(with_lora, unet_out(tiny.unet), atol=1e-3)
    with lora.disabled(models.unet):
        assert torch.equal(unet_out(models.unet), unet_out(tiny.unet))
    assert torch.equal(unet_out(models.unet), with_lora)
    with pytest.raises(KeyError):
        with lora.disabled(models.unet):
            raise KeyError("inside")
    assert torch.equal(unet_out(models.unet), with_lora)
    lora.merge(models.unet)
    with pytest.raises(ValueError, match="merged"):
        with lora.disabled(models.unet):
            pass
