"""guided_eps runs only the UNet branches each row needs (w = 1: cond only, w = 0: uncond only), checked
against the two-branch computation done independently: outputs, rows evaluated, gradients, whole
sampling runs with DiffExp's schedule, DDPO's re-scoring, and fixed CFG (bit-identical to two branches)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import diffusion
import explore
from conftest import float32_tolerance
from diffusion import guided_eps, sample, step_log_prob

T = 4  # DDIM steps: timesteps 751, 501, 251, 1


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def two_branch(unet, x, t, cond, uncond, w):
    """The always-two-branch guided eps: [uncond; cond] in one 2B-row call, then u + w (c - u)."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device).expand(B)
    emb, added = diffusion.unpack_cond(unet, torch.cat([uncond.expand(B, -1, -1), cond]))
    dtype = next(unet.parameters()).dtype  # as guided_eps: the UNet's inputs in its weights' dtype
    out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), encoder_hidden_states=emb, added_cond_kwargs=added).sample
    eps_uncond, eps_cond = out.float().chunk(2)
    return eps_uncond + w.to(x.device).view(B, 1, 1, 1).float() * (eps_cond - eps_uncond)


def separate(unet, x, t, cond, uncond):
    """eps_uncond and eps_cond from two separate B-row UNet calls."""
    B = x.shape[0]
    t = torch.as_tensor(t).expand(B)
    outs = []
    for c in (uncond.expand(B, -1, -1), cond):
        emb, added = diffusion.unpack_cond(unet, c)
        outs.append(unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample)
    return outs


class RowCounter:
    """Forward hook: the batch size of every UNet call, and the last call's output."""

    def __init__(self, unet):
        self.rows, self.out = [], None
        self.handle = unet.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.rows.append(args[0].shape[0])
        self.out = output.sample.detach()


@pytest.fixture
def counter(tiny):
    c = RowCounter(tiny.unet)
    yield c
    c.handle.remove()


# -----------------------------------------------------------------------------
# One call

@pytest.mark.parametrize("per_row_uncond", [False, True])
def test_mixed_weights_against_separate_calls(tiny, cond, uncond, per_row_uncond):
    """Rows with w in {0, 1, 3.5}, at different timesteps: u, c and u + 3.5 (c - u) of separate UNet calls."""
    x, t = randn(6, 4, 16, 16), torch.tensor([901, 501, 1, 751, 251, 21])
    c6, w = torch.cat([cond, cond.flip(0)]), torch.tensor([0.0, 1.0, 3.5, 1.0, 3.5, 0.0])
    u = uncond.expand(6, -1, -1).clone() if per_row_uncond else uncond  # (6, 77, D) or (1, 77, D)
    with torch.no_grad():
        eps = guided_eps(tiny.unet, x, t, c6, u, w)
        eps_u, eps_c = separate(tiny.unet, x, t, c6, uncond)
    expected = torch.where(w.view(6, 1, 1, 1) == 1, eps_c, torch.where(w.view(6, 1, 1, 1) == 0, eps_u, eps_u + 3.5 * (eps_c - eps_u)))
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eps_u, eps_c, atol=1e-4)  # the prompt matters, so the check means something


@pytest.mark.parametrize("w, rows", [([1.0, 1.0, 5.0], 4), ([0.0, 1.0, 5.0], 4), ([5.0, 5.0, 5.0], 6),
                                     ([1.0, 1.0, 1.0], 3), ([0.0, 0.0, 0.0], 3), ([0.0, 7.5, 0.0], 4)])
def test_rows_evaluated(tiny, cond, uncond, counter, w, rows):
    """One UNet call per guided_eps, of one row per single-branch row and two per guided row; a w = 1 row
    returns that call's cond output itself and a w = 0 row its uncond output (not u + w (c - u))."""
    w = torch.tensor(w)
    with torch.no_grad():
        eps = guided_eps(tiny.unet, randn(3, 4, 16, 16), 501, cond, uncond, w)
    assert counter.rows == [rows]
    u_rows, c_rows = (w != 1).nonzero()[:, 0].tolist(), (w != 0).nonzero()[:, 0].tolist()
    u_out, c_out = counter.out[:len(u_rows)], counter.out[len(u_rows):]  # the call: uncond rows, then cond rows
    for b in range(3):
        if w[b] == 1:
            assert torch.equal(eps[b], c_out[c_rows.index(b)])
        elif w[b] == 0:
            assert torch.equal(eps[b], u_out[u_rows.index(b)])


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_gradients_through_skipped_branches(lora_models, cond, uncond, use_checkpoint):
    """LoRA and input gradients of a loss on guided_eps with w in {0, 1, 3.5} equal those of the
    two-branch computation; also under gradient checkpointing (as AlignProp runs it)."""
    models, params = lora_models()
    x0, t, w = randn(3, 4, 16, 16, seed=1), torch.tensor([751, 251, 1]), torch.tensor([1.0, 0.0, 3.5])
    weight = randn(3, 4, 16, 16, seed=2)

    def grads(fn):
        x = x0.clone().requires_grad_()
        if use_checkpoint:
            eps = checkpoint(fn, models.unet, x, t, cond, uncond, w, use_reentrant=False)
        else:
            eps = fn(models.unet, x, t, cond, uncond, w)
        (eps * weight).sum().backward()
        out = [x.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    got, expected = grads(guided_eps), grads(two_branch)
    assert any(g.abs().sum() > 0 for g in got[1:])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdxl_packed_conditioning(counter):
    """Tiny SDXL: the rows' pooled embeddings and micro-conditioning are selected with them."""
    sdxl = diffusion.load_models("tiny-sdxl")
    cond, uncond = diffusion.encode_text(sdxl, ["a cat", "a dog", "an owl"]), diffusion.encode_text(sdxl, [""])
    x, t, w = randn(3, 4, 16, 16), torch.tensor([700, 30, 400]), torch.tensor([1.0, 0.0, 3.5])
    rows = []
    hook = sdxl.unet.register_forward_hook(lambda m, args, kw, out: rows.append(kw["added_cond_kwargs"]["text_embeds"].shape[0]),
                                           with_kwargs=True)
    with torch.no_grad():
        eps = guided_eps(sdxl.unet, x, t, cond, uncond, w)
        hook.remove()
        eps_u, eps_c = separate(sdxl.unet, x, t, cond, uncond)
    assert rows == [4]
    torch.testing.assert_close(eps[0], eps_c[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps[1], eps_u[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps[2], eps_u[2] + 3.5 * (eps_c[2] - eps_u[2]), rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# Sampling and re-scoring

def run(models, cond, uncond, guidance, **kw):
    return sample(models, cond, uncond, guidance, T, 1.0, torch.Generator().manual_seed(0), **kw)


def test_diffexp_sampling_equals_two_branch(tiny64, monkeypatch):
    """DiffExp's schedule (w_low = 1 at t > t_thres, then w_high; one row at w_low = 0): images, latents
    and log-probs equal sampling with the two-branch guided eps; the w_low steps run B rows, not 2B.
    The two samplers batch different rows, so they run on the float64 UNet (conftest.tiny64)."""
    tiny, cond, uncond = tiny64
    ts = diffusion.timesteps(tiny, T)
    w = explore.guidance_scales(ts, 3, 5.0, explore.ExploreConfig(t_thres=500), schedule_on=True)  # (3, T)
    w[2] = explore.guidance_scales(ts, 1, 5.0, explore.ExploreConfig(t_thres=500, w_low=0.0), schedule_on=True)[0]
    assert w.tolist() == [[1.0, 1.0, 5.0, 5.0]] * 2 + [[0.0, 0.0, 5.0, 5.0]]  # t = 751, 501 > 500
    counter = RowCounter(tiny.unet)
    new = run(tiny, cond, uncond, w)
    assert counter.rows == [3, 3, 6, 6]
    monkeypatch.setattr(diffusion, "guided_eps", two_branch)
    old = run(tiny, cond, uncond, w)
    assert counter.rows[4:] == [6] * T
    for a, b in ((new.latents, old.latents), (new.log_probs, old.log_probs), (new.images, old.images)):
        torch.testing.assert_close(a, b, rtol=0, atol=float32_tolerance(b))
    counter.handle.remove()


def test_rescoring_mixed_weights_returns_stored_log_probs(tiny, cond, uncond):
    """step_log_prob on stored transitions, all (sample, step) pairs shuffled into one batch whose rows
    carry w 0, 1 and others: the stored log-probs (ratio 1)."""
    w = torch.tensor([[1.0, 1.0, 5.0, 5.0], [0.0, 0.0, 3.5, 1.0], [1.0, 0.0, 3.5, 7.5]])
    traj = run(tiny, cond, uncond, w, decode_images=False)
    b, i = torch.arange(3).repeat_interleave(T), torch.arange(T).repeat(3)
    perm = torch.randperm(3 * T, generator=torch.Generator().manual_seed(1))
    b, i = b[perm], i[perm]
    with torch.no_grad():
        log_prob = step_log_prob(tiny, traj.latents[b, i], traj.timesteps[i], traj.latents[b, i + 1],
                                 cond[b], uncond, w[b, i], 1.0, T)
    torch.testing.assert_close(log_prob, traj.log_probs[b, i], rtol=0, atol=1e-6)
    assert (log_prob - traj.log_probs[b, i]).exp().sub(1).abs().max() < 1e-5


def test_fixed_cfg_sampling_is_bit_identical(tiny, cond, uncond, counter, monkeypatch):
    """Fixed CFG (w = 5 everywhere): the same 2B-row calls and bit-identical results as the two-branch code."""
    new = run(tiny, cond, uncond, 5.0)
    assert counter.rows == [6] * T
    monkeypatch.setattr(diffusion, "guided_eps", two_branch)
    old = run(tiny, cond, uncond, 5.0)
    assert torch.equal(new.latents, old.latents) and torch.equal(new.log_probs, old.log_probs)
    assert torch.equal(new.images, old.images)
