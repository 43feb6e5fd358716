import torch.nn.functional as F

from distillqa.train.losses.base import Divergence


class ULDDistance(Divergence, name="uld"):
    """Universal Logit Distillation (Boizard et al. 2024): D(p, q) = sum_k |p_(k) - q_(k)|, the L1 distance
    between the probabilities sorted in decreasing order, the smaller vocabulary padded with zeros.

    Needs no token correspondence, so p and q may come from two vocabularies of different sizes. Its
    gradient in the fused KD step comes from autograd (`Divergence.value_and_grad`).
    """

    vocabulary_free = True

    def per_token(self, student_logp, teacher_logp):
        q = student_logp.exp().sort(dim=-1, descending=True).values
        p = teacher_logp.exp().sort(dim=-1, descending=True).values
        width = max(p.shape[-1], q.shape[-1])
        return (F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum(-1)


