"""Token-level divergences between a teacher distribution p and a student distribution q.

Each divergence is a small module with its formula in its docstring, computing one value per
token (`per_token`), summed over the vocabulary. `chunked_mean` averages any of them over the
answer tokens of a batch without ever holding more than `chunk` rows of logits at once.
`value_and_grad` gives a divergence's gradient w.r.t. the student's logits for the fused KD step
(`fused.py`): in closed form for forward and reverse KL, JS, generalized JSD, total variation and
adaptive KL; by autograd on one chunk for the skewed forward and reverse KL.
`sparse.py` holds the terms against a cached, sparse teacher distribution (top-k with a tail, sampled).
"""

from distillqa.train.losses.adaptive_kl import AdaptiveKL
from distillqa.train.losses.base import Divergence, chunked_mean
from distillqa.train.losses.forward_kl import ForwardKL
from distillqa.train.losses.generalized_jsd import GeneralizedJSD
from distillqa.train.losses.jensen_shannon import JensenShannon
from distillqa.train.losses.reverse_kl import ReverseKL
from distillqa.train.losses.skewed_kl import SkewedForwardKL, SkewedReverseKL
from distillqa.train.losses.sparse import SampledKL, TopKTail
from distillqa.train.losses.total_variation import TotalVariation

DIVERGENCES: dict[str, type[Divergence]] = {
    "forward_kl": ForwardKL,
    "reverse_kl": ReverseKL,
    "js": JensenShannon,
    "skewed_forward_kl": SkewedForwardKL,
    "skewed_reverse_kl": SkewedReverseKL,
    "tvd": TotalVariation,
    "adaptive_kl": AdaptiveKL,
    "generalized_jsd": GeneralizedJSD,
}

__all__ = ["DIVERGENCES", "Divergence", "SampledKL", "TopKTail", "chunked_mean", *[c.__name__ for c in DIVERGENCES.values()]]
