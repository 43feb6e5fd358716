"""Token-level divergences between a teacher distribution p and a student distribution q, and the
loss they make up with the student's cross-entropy.

Each divergence is a small module in its own file, with its formula in its docstring, computing one
value per token (`per_token`), summed over the vocabulary; it registers itself by name in
`DIVERGENCES` (`class ForwardKL(Divergence, name="forward_kl")`), and every module of this package is
imported here, so a new divergence is one new file. `LossTerms` (`terms.py`) is a KD objective's loss,
w_ce * CE + sum_i w_i * D_i, built from `kd.losses`. `chunked_mean` averages per-token losses over the
answer tokens of a batch without ever holding more than `chunk` rows of logits at once.
`value_and_grad` gives a divergence's gradient w.r.t. the student's logits for the fused KD step
(`fused.py`): in closed form for forward and reverse KL, JS, generalized JSD, total variation and
adaptive KL; by autograd on one chunk for the skewed KLs and ULD.
`sparse.py` holds the terms against a cached, sparse teacher distribution (top-k with a tail, sampled).
"""

import importlib
import pkgutil

from distillqa.train.losses.base import DIVERGENCES, Divergence, chunked_mean, parameters
from distillqa.train.losses.forward_kl import ForwardKL
from distillqa.train.losses.generalized_jsd import GeneralizedJSD
from distillqa.train.losses.sparse import SampledKL, TopKTail
from distillqa.train.losses.terms import LossTerms

for _module in pkgutil.iter_modules(__path__):  # each divergence file registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DIVERGENCES", "Divergence", "ForwardKL", "GeneralizedJSD", "LossTerms", "SampledKL", "TopKTail",
           "chunked_mean", "parameters"]
