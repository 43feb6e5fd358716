"""A KD objective's loss as data: loss = w_ce * CE + sum_i w_i * D_i (`kd.losses`)."""

from __future__ import annotations

import torch
from torch import nn

from distillqa.train.losses.base import Divergence


class LossTerms(nn.Module):
    """loss = w_ce * CE(student, y) + sum_i w_i * D_i(p_teacher || q_student), each term averaged over answer tokens.

    Built from `kd.losses` ([{name: ce, weight: 0.5}, {name: forward_kl, weight: 0.5, temperature: 2.0}]);
    the shorthand keys `kd.kd_rate` r and `kd.divergence` mean [ce: 1 - r, divergence: r]. An objective
    averages CE and the divergences' per-token values [N, k] (`per_token`) and hands them to `total`.
    The logged `kd` is the divergences' weighted mean, sum_i w_i D_i / sum_i w_i (with one divergence, its
    value), so loss = w_ce * CE + kd_weight * kd with kd_weight = sum_i w_i: with the shorthand,
    (1 - r) * CE + r * KD. DSKD puts its three-part KD in place of that mean (dskd.py).
    """

    def __init__(self, ce_weight: float, divergences: list[tuple[float, Divergence]]):
        super().__init__()
        if not divergences:
            raise ValueError("a KD loss needs at least one divergence")
        self.ce_weight = ce_weight
        self.weights = [w for w, _ in divergences]
        self.divergences = nn.ModuleList(d for _, d in divergences)

    @property
    def kd_weight(self) -> float:
        return sum(self.weights)

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Each divergence per token, [N, k]."""
        return torch.stack([d(student_logits, teacher_logits) for d in self.divergences], dim=-1)

    def kd(self, values: torch.Tensor) -> torch.Tensor:
        """The weighted mean of the divergences' averages `values` [k] (all weights 0, as at kd_rate 0: the plain mean)."""
        if self.kd_weight == 0:
            return values.mean()
        return (torch.tensor(self.weights, dtype=values.dtype, device=values.device) * values).sum() / self.kd_weight

    def total(self, ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        return self.ce_weight * ce + self.kd_weight * kd

    def combine(self, ce: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs) from the averaged CE and divergences `values` [k]."""
        return self.total(ce, self.kd(values)), self.logs(ce, values)

    def logs(self, ce: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
        """ce, kd and, with several divergences, each one's value as `kd_<name>` (`kd_<name>_<i>` for a repeated name)."""
        logs = {"ce": ce.item(), "kd": self.kd(values).item()}
        if len(self.divergences) > 1:
            names = [d.name for d in self.divergences]
            for i, (name, value) in enumerate(zip(names, values.tolist())):
                logs[f"kd_{name}" if names.count(name) == 1 else f"kd_{name}_{i}"] = value
        return logs
