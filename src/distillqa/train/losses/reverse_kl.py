from distillqa.train.losses.base import Divergence, kl


def reverse_kl_and_grad(student_logp, teacher_logp):
    """KL(q || p) and its gradient w.r.t. the student's logits z (q = softmax(z)): q * (log q - log p - KL(q || p))."""
    value = kl(student_logp, teacher_logp)
    return value, student_logp.exp() * (student_logp - teacher_logp - value[:, None])


class ReverseKL(Divergence, name="reverse_kl"):
    """Reverse KL: D(q || p) = sum_v q_v (log q_v - log p_v). Mode-seeking: the student concentrates on the teacher's modes.

    dD/dz = q * (log q - log p - D).
    """

    def per_token(self, student_logp, teacher_logp):
        return kl(student_logp, teacher_logp)

    def value_and_grad(self, student_logp, teacher_logp):
        return reverse_kl_and_grad(student_logp, teacher_logp)
