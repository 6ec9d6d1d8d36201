"""Distillation losses: pure functions on tensors (no models, hooks or config).

See :mod:`potstill.losses._common` for the conventions every loss follows and
``docs/losses.md`` for the formulas.
"""

from ._common import IGNORE_INDEX, REDUCTIONS, Reduction, reduce, shared_vocabulary, soft_targets
from .divergences import (
    cross_entropy,
    hinton_loss,
    interpolated_jsd,
    jsd,
    kl_divergence,
    logit_mse,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    total_variation,
)
from .features import (
    ChannelProjection,
    Projection,
    attention_kl,
    attention_map,
    attention_transfer,
    cosine_loss,
    similarity_loss,
)
from .registry import LOSSES, DistillationLoss, LossSpec, check_params, get_loss
from .sparse import SparseTarget, sparse_loss, top_k
from .uld import uld

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "REDUCTIONS",
    "ChannelProjection",
    "DistillationLoss",
    "LossSpec",
    "Projection",
    "Reduction",
    "SparseTarget",
    "attention_kl",
    "attention_map",
    "attention_transfer",
    "check_params",
    "cosine_loss",
    "cross_entropy",
    "get_loss",
    "hinton_loss",
    "interpolated_jsd",
    "jsd",
    "kl_divergence",
    "logit_mse",
    "reduce",
    "reverse_kl",
    "shared_vocabulary",
    "similarity_loss",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "soft_targets",
    "sparse_loss",
    "top_k",
    "total_variation",
    "uld",
]
