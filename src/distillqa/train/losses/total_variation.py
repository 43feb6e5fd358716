from distillqa.train.losses.base import Divergence, softmax_backward


class TotalVariation(Divergence, name="tvd"):
    """Total variation distance: TVD(p, q) = 1/2 sum_v |p_v - q_v|, in [0, 1], symmetric.

    dD/dz = softmax_backward of G = 1/2 q * sign(q - p) (sign(0) = 0, autograd's choice for |x| at 0).
    """

    def per_token(self, student_logp, teacher_logp):
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)

    def value_and_grad(self, student_logp, teacher_logp):
        q, p = student_logp.exp(), teacher_logp.exp()
        return 0.5 * (p - q).abs().sum(-1), softmax_backward(student_logp, 0.5 * q * (q - p).sign())
