from distillqa.train.losses.base import Divergence, check_fraction, kl, log_mix


class GeneralizedJSD(Divergence, name="generalized_jsd"):
    """Generalized JSD (GKD, Agarwal et al. 2024): JSD_b(p || q) = b KL(p || m) + (1 - b) KL(q || m),
    m = b p + (1 - b) q, with 0 < b < 1 (`beta`, 0.5 by default: the ordinary JS divergence).

    As b -> 0, JSD_b / b -> KL(p || q) (forward KL); as b -> 1, JSD_b / (1 - b) -> KL(q || p).
    dD/dz = (1 - b) q * (log q - log m - KL(q || m)): the terms through m cancel (dD/dq_v = (1 - b)(log q_v - log m_v)).
    """

    def __init__(self, temperature: float = 1.0, beta: float = 0.5):
        super().__init__(temperature)
        self.beta = check_fraction("beta", beta)  # the limits are forward_kl and reverse_kl

    def per_token(self, student_logp, teacher_logp):
        m = log_mix(teacher_logp, student_logp, self.beta)
        return self.beta * kl(teacher_logp, m) + (1 - self.beta) * kl(student_logp, m)

    def value_and_grad(self, student_logp, teacher_logp):
        m = log_mix(teacher_logp, student_logp, self.beta)
        student_kl = kl(student_logp, m)
        value = self.beta * kl(teacher_logp, m) + (1 - self.beta) * student_kl
        return value, (1 - self.beta) * student_logp.exp() * (student_logp - m - student_kl[:, None])
