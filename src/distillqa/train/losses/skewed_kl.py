from distillqa.train.losses.base import Divergence, check_fraction, kl, log_mix


class SkewedForwardKL(Divergence, name="skewed_forward_kl"):
    """Skewed forward KL (DistiLLM): SKL_l(p, q) = KL(p || l p + (1 - l) q), skew l = 0.1 by default.

    Mixing a little of p into q keeps the divergence finite where q underflows. Its gradient in the fused
    KD step comes from autograd (`Divergence.value_and_grad`), as does the skewed reverse KL's.
    """

    def __init__(self, temperature: float = 1.0, skew: float = 0.1):
        super().__init__(temperature)
        self.skew = check_fraction("skew", skew)

    def per_token(self, student_logp, teacher_logp):
        return kl(teacher_logp, log_mix(teacher_logp, student_logp, self.skew))


class SkewedReverseKL(Divergence, name="skewed_reverse_kl"):
    """Skewed reverse KL (DistiLLM): SRKL_l(p, q) = KL(q || l q + (1 - l) p), skew l = 0.1 by default."""

    def __init__(self, temperature: float = 1.0, skew: float = 0.1):
        super().__init__(temperature)
        self.skew = check_fraction("skew", skew)

    def per_token(self, student_logp, teacher_logp):
        return kl(student_logp, log_mix(student_logp, teacher_logp, self.skew))
