"""Behaviour of `dinrec.nn.auxiliary`: equals a slow per-step reference, ignores padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinrec.errors import ShapeError
from dinrec.nn.auxiliary import AuxiliaryNet, auxiliary_loss

B, T, H, E, K = 5, 6, 4, 3, 2
LENGTHS = torch.tensor([0, 1, 6, 3, 4])


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    clicked = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    neg = torch.randn(B, T, K, E, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] < LENGTHS[:, None]  # (B, T)
    return states, clicked, neg, mask


def _net(norm="reference", seed=0):
    torch.manual_seed(seed)
    net = AuxiliaryNet(H, E, norm=norm).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def _slow(net, states, clicked, neg, mask):
    """Per-pair loop: -log p(click) - mean_k log(1 - p(non-click k)), mean over valid pairs."""
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if not (mask[b, t] and mask[b, t + 1]):
                continue
            p = torch.sigmoid(net(torch.cat([states[b, t], clicked[b, t + 1]])[None]))[0]
            loss = -torch.log(p)
            for k in range(neg.shape[2]):
                q = torch.sigmoid(net(torch.cat([states[b, t], neg[b, t + 1, k]])[None]))[0]
                loss = loss - torch.log(1 - q) / neg.shape[2]
            total, count = total + loss, count + 1
    return total, count


def test_equals_slow_per_step_reference():
    states, clicked, neg, mask = _data()
    net = _net()
    total, count = _slow(net, states, clicked, neg, mask)
    assert count == sum(max(n - 1, 0) for n in LENGTHS.tolist())
    torch.testing.assert_close(auxiliary_loss(net, states, clicked, neg, mask), total / count)
    torch.testing.assert_close(auxiliary_loss(net, states, clicked, neg, mask, reduction="sum"), total)
    ref = auxiliary_loss(net, states, clicked, neg, mask, reduction="reference")
    torch.testing.assert_close(ref, total / (B * (T - 1)))  # the reference's reduce_mean


def test_single_negative_as_3d_equals_k1():
    states, clicked, neg, mask = _data(1)
    net = _net()
    a = auxiliary_loss(net, states, clicked, neg[:, :, 0], mask)
    b = auxiliary_loss(net, states, clicked, neg[:, :, :1], mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm", ["reference", "batch", "none"])
def test_padding_changes_nothing(norm):
    states, clicked, neg, mask = _data(2)
    net = _net(norm)
    results = []
    for fill in (None, float("nan"), 1e6):
        s, c, n = states.clone(), clicked.clone(), neg.clone()
        if fill is not None:
            s[~mask], c[~mask], n[~mask] = fill, fill, fill
        s.requires_grad_()
        c.requires_grad_()
        loss = auxiliary_loss(net, s, c, n, mask)
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        assert torch.all(s.grad[~mask] == 0) and torch.all(c.grad[~mask] == 0)
        results.append((loss, s.grad[mask], c.grad[mask], grads))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0])
        torch.testing.assert_close(other[1], results[0][1])
        torch.testing.assert_close(other[2], results[0][2])
        for g0, g1 in zip(results[0][3], other[3], strict=True):
            torch.testing.assert_close(g1, g0)


def test_last_valid_state_and_first_click_are_unused():
    """h at the last valid step has no successor; e at step 0 has no predecessor."""
    states, clicked, neg, mask = _data(3)
    net = _net()
    s, c = states.clone().requires_grad_(), clicked.clone().requires_grad_()
    auxiliary_loss(net, s, c, neg, mask).backward()
    for b, n in enumerate(LENGTHS.tolist()):
        if n > 0:
            assert torch.all(s.grad[b, n - 1] == 0)
            assert torch.all(c.grad[b, 0] == 0)
        if n > 1:
            assert s.grad[b, : n - 1].abs().sum() > 0 and c.grad[b, 1:n].abs().sum() > 0


def test_no_valid_pair_gives_zero_and_backward_works():
    states, clicked, neg, mask = _data(4)
    mask = torch.zeros_like(mask)
    mask[:, 0] = True  # length 1 everywhere: no (t, t+1) pair
    s = states.clone().requires_grad_()
    loss = auxiliary_loss(_net("batch"), s, clicked, neg, mask)
    loss.backward()
    assert loss.item() == 0 and torch.all(s.grad == 0)


def test_one_logit_equals_the_references_two_way_softmax():
    """softmax([z0, z1])[0] == sigmoid(z0 - z1): the 2-unit output layer is one logit."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(8, 50, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(2, 50, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    two = torch.softmax(F.linear(hidden, w2, b2), -1)[:, 0]
    one = torch.sigmoid(F.linear(hidden, w2[:1] - w2[1:], b2[:1] - b2[1:]))[:, 0]
    torch.testing.assert_close(one, two)
    # and the reference BN (frozen statistics) is an affine map: identity at init, up to 1/sqrt(1+eps)
    net = AuxiliaryNet(H, E).double()
    x = torch.randn(4, H + E, dtype=torch.float64)
    torch.testing.assert_close(net.norm(x), x / math.sqrt(1 + 1e-3))


def test_shape_errors():
    states, clicked, neg, mask = _data()
    net = _net()
    with pytest.raises(ShapeError):
        auxiliary_loss(net, states[:, :3], clicked, neg, mask)
    with pytest.raises(ShapeError):
        auxiliary_loss(net, states, clicked, neg[..., :2], mask)
    with pytest.raises(ValueError, match="reduction"):
        auxiliary_loss(net, states, clicked, neg, mask, reduction="avg")


@pytest.mark.parametrize("norm", ["reference", "none"])
@pytest.mark.parametrize("hidden", [(100, 50), (7,), (6, 5, 4)])
def test_pair_logits_equal_the_concatenated_forward_with_gradients(norm, hidden):
    """The split-first-layer MLP with its hand-written backward == net(cat([h, e])) through
    autograd: values and the gradients of states, items and every parameter."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    net = AuxiliaryNet(H, E, hidden=hidden, norm=norm).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    states = torch.randn(9, H, generator=g, dtype=torch.float64)
    items = torch.randn(3, 9, E, generator=g, dtype=torch.float64)
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    results = []
    for fast in (True, False):
        s, it = states.clone().requires_grad_(), items.clone().requires_grad_()
        if fast:
            logits = net.pair_logits(s, it)  # (M, N)
        else:
            logits = net(torch.cat([s.expand(3, 9, H), it], 2).reshape(27, -1)).view(3, 9)
        (logits * w).sum().backward()
        results.append([logits, s.grad, it.grad, *(p.grad.clone() for p in net.parameters())])
        net.zero_grad()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_pair_logits_pass_gradcheck():
    g = torch.Generator().manual_seed(7)

    class Pairs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, s, it):
            return self.net.pair_logits(s, it)

    module = Pairs()
    names = [n for n, _ in module.named_parameters()]
    states = torch.randn(4, H, generator=g, dtype=torch.float64, requires_grad=True)
    items = torch.randn(2, 4, E, generator=g, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def f(s, it, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (s, it))

    assert torch.autograd.gradcheck(f, [states, items, *params], fast_mode=True)
