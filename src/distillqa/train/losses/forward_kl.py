from distillqa.train.losses.base import Divergence, kl


class ForwardKL(Divergence):
    """Forward KL: D(p || q) = sum_v p_v (log p_v - log q_v). Mean-seeking: the student covers the teacher's mass."""

    def per_token(self, student_logp, teacher_logp):
        return kl(teacher_logp, student_logp)
