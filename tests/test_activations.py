"""Tests of dinrec.nn.activations: per-channel PReLU and Dice with running statistics."""

from __future__ import annotations

import pytest
import torch

from dinrec.errors import DinrecError, ShapeError
from dinrec.nn.activations import Dice, PReLU, dice, dice_batch, prelu


def test_prelu_hand_formula_and_init():
    m = PReLU(3)
    assert torch.equal(m.alpha.detach(), torch.full((3,), 0.1))
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.1, 0.5, -2.0]))
    x = torch.tensor([[-1.0, -2.0, -3.0], [1.0, 2.0, 3.0], [0.0, -0.5, 0.5]])
    want = torch.where(x > 0, x, x * m.alpha.detach())
    assert torch.allclose(m(x), want)
    assert torch.allclose(prelu(x, m.alpha), want)


@pytest.mark.parametrize("shape", [(5, 4), (2, 7, 4), (3, 2, 2, 4)])
def test_prelu_matches_torch_channel_layout(shape):
    torch.manual_seed(0)
    ours = PReLU(4)
    ref = torch.nn.PReLU(num_parameters=4)
    with torch.no_grad():
        ours.alpha.copy_(torch.rand(4))
        ref.weight.copy_(ours.alpha)
    x = torch.randn(shape)
    # torch.nn.PReLU puts channels on axis 1; ours on the last axis
    want = ref(x.movedim(-1, 1)).movedim(1, -1)
    assert torch.allclose(ours(x), want)
    ours(x).sum().backward()
    assert ours.alpha.grad is not None and ours.alpha.grad.shape == (4,)


def test_prelu_shape_error():
    with pytest.raises(ShapeError):
        PReLU(4)(torch.zeros(2, 3))


def reference_dice(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """DIEN utils.dice, line by line (batch statistics over all but the last axis)."""
    axes = list(range(x.dim() - 1))
    mean = x.mean(dim=axes, keepdim=True)
    std = torch.sqrt(((x - mean) ** 2 + eps).mean(dim=axes, keepdim=True))
    x_p = torch.sigmoid((x - mean) / (std + eps))
    return alpha * (1.0 - x_p) * x + x_p * x


@pytest.mark.parametrize("shape", [(16, 6), (4, 5, 6)])
def test_dice_train_mode_is_reference(shape):
    torch.manual_seed(1)
    m = Dice(6)
    assert torch.equal(m.alpha.detach(), torch.zeros(6))
    with torch.no_grad():
        m.alpha.uniform_(-1, 1)
    x = torch.randn(shape) * 3 + 1
    out = m.train()(x)
    assert out.shape == x.shape
    assert torch.allclose(out, reference_dice(x, m.alpha.detach()), atol=1e-6)
    out.sum().backward()
    assert m.alpha.grad is not None


def test_dice_running_stats_converge_and_eval_uses_them():
    torch.manual_seed(2)
    m = Dice(3, momentum=0.1)
    true_mean = torch.tensor([2.0, -1.0, 0.0])
    true_std = torch.tensor([0.5, 3.0, 1.0])
    for _ in range(200):
        m(torch.randn(256, 3) * true_std + true_mean)
    assert torch.allclose(m.running_mean, true_mean, atol=0.15)
    assert torch.allclose(m.running_var, true_std**2, rtol=0.15)
    assert int(m.num_batches_tracked) == 200

    m.eval()
    x = torch.randn(8, 3) * true_std + true_mean
    before = m.running_mean.clone()
    out = m(x)
    assert torch.equal(m.running_mean, before)  # eval does not update
    want = dice(x, m.alpha, m.running_mean, m.running_var, m.eps)
    assert torch.allclose(out, want)
    # train mode on the same batch differs (batch statistics of 8 rows)
    assert not torch.allclose(m.train()(x), out)


def test_dice_cumulative_average_momentum_none():
    m = Dice(2, momentum=None)
    a = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    b = torch.tensor([[4.0, 8.0], [6.0, 12.0]])
    m(a)
    m(b)
    assert torch.allclose(m.running_mean, torch.tensor([3.0, 6.0]))
    assert torch.allclose(m.running_var, torch.tensor([2.0, 8.0]))  # mean of unbiased vars


def test_dice_eval_independent_of_batch_composition():
    torch.manual_seed(3)
    m = Dice(4)
    for _ in range(20):
        m(torch.randn(32, 5, 4) * 2 + 0.5)
    m.eval()
    x = torch.randn(6, 5, 4)
    full = m(x)
    for i in range(6):
        assert torch.allclose(m(x[i : i + 1]), full[i : i + 1], atol=1e-6)
    other = torch.cat([x[:2], torch.randn(10, 5, 4) * 100])
    assert torch.allclose(m(other)[:2], full[:2], atol=1e-6)


def test_dice_mask_excludes_padding_from_stats():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = x.masked_fill(~mask[..., None], 1e6)  # garbage at padded positions
    m1, m2 = Dice(2), Dice(2)
    out = m1(padded, mask)
    m2(x[mask])  # the same valid rows, no padding
    assert torch.allclose(m1.running_mean, m2.running_mean)
    assert torch.allclose(m1.running_var, m2.running_var)
    assert torch.allclose(out[mask], reference_dice(x[mask], m1.alpha.detach()), atol=1e-6)
    with pytest.raises(ShapeError):
        m1(x, mask[:, :4])


def test_dice_state_dict_and_errors():
    m = Dice(3)
    m(torch.randn(10, 3))
    keys = set(m.state_dict())
    assert keys == {"alpha", "running_mean", "running_var", "num_batches_tracked"}
    m2 = Dice(3)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.running_mean, m.running_mean)
    with pytest.raises(ShapeError):
        m(torch.zeros(2, 4))
    with pytest.raises(DinrecError):
        Dice(3, momentum=1.5)


def test_prelu_gradients_match_the_two_sided_formula():
    """The fused kernel's gradients, for x and the slopes, on (B, T, C) and (B, C) inputs."""
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 3, 4), (6, 4)]:
        x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        alpha = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(prelu, (x, alpha))
        up = torch.randn(shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(prelu(x, alpha), (x, alpha), up)
        want = torch.autograd.grad(torch.clamp_min(x, 0) + alpha * torch.clamp_max(x, 0), (x, alpha), up)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (37, 5), (4, 6, 5)])
def test_fused_dice_equals_the_autograd_formula(shape):
    """Training-mode Dice (fused) == `dice` with the batch statistics under autograd:
    output, gradients of x and alpha, running estimates; a constant column included."""
    g = torch.Generator().manual_seed(5)
    c = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    x[..., 0] = 1.25  # zero variance
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    m = Dice(c).double()
    with torch.no_grad():
        m.alpha.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    xf = x.clone().requires_grad_()
    out = m(xf)
    out.backward(up)

    xr = x.clone().requires_grad_()
    alpha = m.alpha.detach().clone().requires_grad_()
    flat = xr.reshape(-1, c)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    want = dice(xr, alpha, mean, var, m.eps)
    want.backward(up)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.alpha.grad, alpha.grad, rtol=1e-10, atol=1e-12)
    n = flat.shape[0]
    unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
    torch.testing.assert_close(m.running_mean, 0.1 * mean.detach())
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * unbiased)


def test_fused_dice_gradcheck_and_float32():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: dice_batch(a, b)[0], (x, alpha))
    x32 = torch.randn(128, 200, generator=g) * 3
    m = Dice(200)
    with torch.no_grad():
        m.alpha.uniform_(-1, 1)
    torch.testing.assert_close(m(x32), reference_dice(x32, m.alpha.detach()), rtol=1e-5, atol=1e-5)
