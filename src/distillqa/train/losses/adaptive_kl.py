import torch

from distillqa.train.losses.base import Divergence, check_fraction, kl
from distillqa.train.losses.forward_kl import forward_kl_and_grad
from distillqa.train.losses.reverse_kl import reverse_kl_and_grad


class AdaptiveKL(Divergence, name="adaptive_kl"):
    """Adaptive KL (Wu et al. 2024): AKL = g_head * KL(p || q) + g_tail * KL(q || p).

    Sort the vocabulary by teacher probability; the head is the smallest prefix whose
    cumulative teacher mass reaches mu (mu = `head_mass`, 0.5 by default), the tail the rest.
    With gap_H = sum_{v in head} |p_v - q_v| and gap_T = sum_{v in tail} |p_v - q_v|,
    g_head = gap_H / (gap_H + gap_T) and g_tail = 1 - g_head. The weights are computed without
    gradient: they choose how much of each KL to apply, not a direction to move in. So
    dD/dz = g_head * dKL(p || q)/dz + g_tail * dKL(q || p)/dz, the two KLs' closed forms.
    """

    def __init__(self, temperature: float = 1.0, head_mass: float = 0.5):
        super().__init__(temperature)
        self.head_mass = check_fraction("head_mass", head_mass)

    @torch.no_grad()
    def head_weight(self, student_logp, teacher_logp):
        """g_head per token [N]."""
        p, q = teacher_logp.exp(), student_logp.exp()
        sorted_p, order = p.sort(dim=-1, descending=True)
        # A token is in the head if the mass strictly before it is below mu.
        in_head_sorted = (sorted_p.cumsum(-1) - sorted_p) < self.head_mass
        in_head = torch.zeros_like(in_head_sorted).scatter(-1, order, in_head_sorted)
        gap = (p - q).abs()
        return ((gap * in_head).sum(-1) / gap.sum(-1).clamp_min(torch.finfo(gap.dtype).tiny))

    def per_token(self, student_logp, teacher_logp):
        g_head = self.head_weight(student_logp, teacher_logp)
        return g_head * kl(teacher_logp, student_logp) + (1 - g_head) * kl(student_logp, teacher_logp)

    def value_and_grad(self, student_logp, teacher_logp):
        g_head = self.head_weight(student_logp, teacher_logp)
        forward, forward_grad = forward_kl_and_grad(student_logp, teacher_logp)
        reverse, reverse_grad = reverse_kl_and_grad(student_logp, teacher_logp)
        g = g_head[:, None]
        return g_head * forward + (1 - g_head) * reverse, g * forward_grad + (1 - g) * reverse_grad
