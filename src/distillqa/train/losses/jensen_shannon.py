from distillqa.train.losses.generalized_jsd import GeneralizedJSD


class JensenShannon(GeneralizedJSD, name="js"):
    """Jensen-Shannon: JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2. Symmetric, bounded by log 2.

    The generalized JSD at b = 1/2 (its closed-form gradient included).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature, beta=0.5)
