from distillqa.train.losses.base import Divergence, kl, log_mix


class JensenShannon(Divergence):
    """Jensen-Shannon: JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2. Symmetric, bounded by log 2."""

    def per_token(self, student_logp, teacher_logp):
        m = log_mix(teacher_logp, student_logp, 0.5)
        return 0.5 * kl(teacher_logp, m) + 0.5 * kl(student_logp, m)
