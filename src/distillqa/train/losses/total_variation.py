from distillqa.train.losses.base import Divergence


class TotalVariation(Divergence):
    """Total variation distance: TVD(p, q) = 1/2 sum_v |p_v - q_v|, in [0, 1], symmetric."""

    def per_token(self, student_logp, teacher_logp):
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
