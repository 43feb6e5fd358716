import torch

from distillqa.train.losses.base import Divergence, kl


def forward_kl_and_grad(student_logp, teacher_logp):
    """KL(p || q) and its gradient w.r.t. the student's logits z (q = softmax(z)): q - p.

    Five passes over the vocabulary, not `kl`'s eight: the teacher's log-probabilities come from log_softmax of
    finite logits, so they are finite and need no guard for 0 * log 0."""
    p = teacher_logp.exp()
    return torch.linalg.vecdot(p, teacher_logp - student_logp), student_logp.exp() - p


class ForwardKL(Divergence, name="forward_kl"):
    """Forward KL: D(p || q) = sum_v p_v (log p_v - log q_v). Mean-seeking: the student covers the teacher's mass.

    dD/dz = q - p.
    """

    def per_token(self, student_logp, teacher_logp):
        return kl(teacher_logp, student_logp)

    def value_and_grad(self, student_logp, teacher_logp):
        return forward_kl_and_grad(student_logp, teacher_logp)
