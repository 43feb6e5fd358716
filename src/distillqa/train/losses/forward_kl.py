from distillqa.train.losses.base import Divergence, kl


def forward_kl_and_grad(student_logp, teacher_logp):
    """KL(p || q) and its gradient w.r.t. the student's logits z (q = softmax(z)): q - p."""
    return kl(teacher_logp, student_logp), student_logp.exp() - teacher_logp.exp()


class ForwardKL(Divergence):
    """Forward KL: D(p || q) = sum_v p_v (log p_v - log q_v). Mean-seeking: the student covers the teacher's mass.

    dD/dz = q - p.
    """

    def per_token(self, student_logp, teacher_logp):
        return kl(teacher_logp, student_logp)

    def value_and_grad(self, student_logp, teacher_logp):
        return forward_kl_and_grad(student_logp, teacher_logp)
