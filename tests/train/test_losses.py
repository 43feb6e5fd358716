"""Each divergence against a float64 reference written directly from its formula, plus identities."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillqa.train.losses import DIVERGENCES, GeneralizedJSD, chunked_mean

T = 2.0


def probs(logits):
    return torch.softmax(logits / T, dim=-1)


def KL(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def reference(name, s, t):
    q, p = probs(s), probs(t)
    if name == "forward_kl":
        return KL(p, q)
    if name == "reverse_kl":
        return KL(q, p)
    if name == "js":
        m = (p + q) / 2
        return 0.5 * KL(p, m) + 0.5 * KL(q, m)
    if name == "skewed_forward_kl":
        return KL(p, 0.1 * p + 0.9 * q)
    if name == "skewed_reverse_kl":
        return KL(q, 0.1 * q + 0.9 * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "generalized_jsd":
        m = 0.5 * p + 0.5 * q
        return 0.5 * KL(p, m) + 0.5 * KL(q, m)
    if name == "adaptive_kl":
        out = []
        for pi, qi in zip(p, q):
            order = sorted(range(len(pi)), key=lambda v: -pi[v].item())
            head, mass = set(), 0.0
            for v in order:
                if mass >= 0.5:
                    break
                head.add(v)
                mass += pi[v].item()
            gap = (pi - qi).abs().detach()
            g = sum(gap[v] for v in head) / gap.sum()
            out.append(g * KL(pi[None], qi[None])[0] + (1 - g) * KL(qi[None], pi[None])[0])
        return torch.stack(out)
    if name == "uld":
        return (p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1)
    raise KeyError(name)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_values_and_gradients_match_the_formula(name):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    div = DIVERGENCES[name](temperature=T)
    got = div(s, t)
    want = reference(name, s, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("widths", [(11, 30), (30, 11)], ids=["teacher-wider", "student-wider"])
def test_uld_between_two_vocabulary_sizes_is_the_padded_sorted_formula(widths):
    """ULD sorts only the smaller width's worth of the wider side (topk) and adds the rest of its mass."""
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(6, widths[0], generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, widths[1], generator=g, dtype=torch.float64) * 3
    got = DIVERGENCES["uld"](temperature=T)(s, t)
    p, q = (torch.softmax(x / T, -1).sort(-1, descending=True).values for x in (t, s))
    width = max(widths)
    want = (F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), s)[0], torch.autograd.grad(want.sum(), s)[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_zero_for_identical_distributions_and_positive_otherwise(name):
    x = torch.randn(4, 9, dtype=torch.float64)
    div = DIVERGENCES[name](temperature=T)
    assert div(x, x).abs().max() < 1e-12
    assert (div(x, x + torch.randn_like(x)) > 0).all()


@pytest.mark.parametrize("name, symmetric", [("js", True), ("tvd", True), ("forward_kl", False), ("reverse_kl", False)])
def test_symmetry(name, symmetric):
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    div = DIVERGENCES[name]()
    assert torch.allclose(div(a, b), div(b, a)) == symmetric
    if name == "forward_kl":
        torch.testing.assert_close(div(a, b), DIVERGENCES["reverse_kl"]()(b, a))


def test_generalized_jsd_limits():
    s, t = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    fkl, rkl = DIVERGENCES["forward_kl"]()(s, t), DIVERGENCES["reverse_kl"]()(s, t)
    torch.testing.assert_close(GeneralizedJSD(beta=1e-6)(s, t) / 1e-6, fkl, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(GeneralizedJSD(beta=1 - 1e-6)(s, t) / 1e-6, rkl, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(GeneralizedJSD(beta=0.5)(s, t), DIVERGENCES["js"]()(s, t))
    assert (DIVERGENCES["js"]()(s * 50, t * 50) <= math.log(2) + 1e-12).all()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        GeneralizedJSD(beta=0.0)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_chunked_equals_unchunked(name):
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    teacher = torch.randn(23, 50)
    div = DIVERGENCES[name](temperature=T)

    def per_token(h, t):
        return div(head(h), t)

    grads = []
    values = []
    for chunk in (None, 5):
        head.zero_grad()
        hidden.grad = None
        loss = chunked_mean(per_token, (hidden, teacher), chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append((hidden.grad.clone(), head.weight.grad.clone()))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-6)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_value_and_grad_matches_autograd_of_the_value(name):
    """The closed forms the fused KD step uses (autograd itself for the divergences without one)."""
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(6, 11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher_logp = torch.log_softmax(torch.randn(6, 11, generator=g, dtype=torch.float64) * 3, dim=-1)
    div = DIVERGENCES[name]()
    value, grad = div.value_and_grad(torch.log_softmax(z, dim=-1).detach(), teacher_logp)
    want = div.per_token(torch.log_softmax(z, dim=-1), teacher_logp)
    (want_grad,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-10)


def test_a_divergence_in_one_new_class_is_a_loss_the_config_accepts(monkeypatch):
    """Registration by name is all a new divergence needs: `kd.divergence` and `kd.losses` accept it, with its
    own parameters, and the objective builds it."""
    from distillqa.config import KDConfig
    from distillqa.train.distill import make_loss_terms
    from distillqa.train.losses import Divergence, parameters

    monkeypatch.setattr("distillqa.train.losses.base.DIVERGENCES", dict(DIVERGENCES))  # registered for this test only
    import distillqa.train.losses.base as base

    class Squared(Divergence, name="squared_test"):
        """sum_v (p_v - q_v)^2 * scale."""

        def __init__(self, temperature: float = 1.0, scale: float = 1.0):
            super().__init__(temperature)
            self.scale = scale

        def per_token(self, student_logp, teacher_logp):
            return self.scale * (teacher_logp.exp() - student_logp.exp()).pow(2).sum(-1)

    assert base.DIVERGENCES["squared_test"] is Squared and parameters("squared_test") == {"temperature": 1.0, "scale": 1.0}
    monkeypatch.setattr("distillqa.train.losses.DIVERGENCES", base.DIVERGENCES)
    monkeypatch.setattr("distillqa.train.distill.DIVERGENCES", base.DIVERGENCES)
    terms = make_loss_terms(KDConfig(losses=[{"name": "ce", "weight": 0.5}, {"name": "squared_test", "weight": 0.5, "scale": 3.0}]))
    assert isinstance(terms.divergences[0], Squared) and terms.divergences[0].scale == 3.0
    assert isinstance(make_loss_terms(KDConfig(divergence="squared_test")).divergences[0], Squared)
    with pytest.raises(ValueError, match="has no parameter beta"):
        KDConfig(losses=[{"name": "squared_test", "weight": 1, "beta": 0.2}])
    with pytest.raises(TypeError, match="is taken"):
        class Again(Divergence, name="squared_test"):
            pass
