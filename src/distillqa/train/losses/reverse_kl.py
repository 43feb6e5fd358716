from distillqa.train.losses.base import Divergence, kl


class ReverseKL(Divergence):
    """Reverse KL: D(q || p) = sum_v q_v (log q_v - log p_v). Mode-seeking: the student concentrates on the teacher's modes."""

    def per_token(self, student_logp, teacher_logp):
        return kl(student_logp, teacher_logp)
