"""The math every lightning-clip callback shares, usable from a plain PyTorch loop. No Lightning import.

* `norms`: total, per-tensor and per-group gradient norms in one fused
  pass, and the finite check.
* `clipping`: clip coefficients and fused in-place scaling.
* `thresholds`: the running statistics that turn a stream of norms into
  clipping thresholds (``mean``, loss-aware by default, ZClip's ``zscore``, AutoClip's ``percentile``).
* `per_tensor`: per-tensor thresholds (AdaGC, the per-tensor ``mean`` rule) over one stacked statistics
  tensor (their shared base: `per_tensor_rule`), and the fused per-tensor multiply.
* `band`: where the training loss (or a norm) stands against its healthy level (`LossBand`).
* `ceiling`: the loss-aware ceiling of the ``mean`` rule (its probe of a stall: `probe`), and `cautious`,
  its start alone under Adam's family.
* `divergence`: the finite divergence detector of `ExplosionGuard`.
* `health`: per-layer and through-time gradient health, spectral radii.
* `causes`: what makes gradients vanish, measured: activation sites of the autograd graph, their
  derivatives, dead units, weight scales, residual connections, a recent loss or norm jump.
* `gates`: the gates of recurrent layers, recomputed from their input, output and weights.

Examples:
    >>> import torch
    >>> from lightning_clip import functional
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.ones(3, 4)).sum().backward()
    >>> grads = functional.collect_grads(model.parameters())
    >>> total, per_tensor = functional.grad_norms(grads)
    >>> coef = functional.clip_coef(total, max_norm=0.5)
    >>> functional.scale_grads_(grads, coef)
    >>> round(float(functional.total_norm(grads)), 4) == round(min(float(total), 0.5), 4)
    True
"""

from lightning_clip.functional import (
    band,
    causes,
    clipping,
    divergence,
    gates,
    health,
    norms,
    per_tensor,
    thresholds,
)
from lightning_clip.functional.band import LossBand
from lightning_clip.functional.cautious import CautiousMeanThreshold
from lightning_clip.functional.ceiling import LossAwareMeanThreshold
from lightning_clip.functional.clipping import EPS, clip_coef, clip_grads_, scale_grads_
from lightning_clip.functional.divergence import DivergenceDetector
from lightning_clip.functional.health import spectral_radius
from lightning_clip.functional.norms import all_finite, collect_grads, grad_norms, group_norms, total_norm
from lightning_clip.functional.optimizers import ceiling_applies
from lightning_clip.functional.per_tensor import AdaGCRule, MeanPerTensorRule, PerTensorScaler
from lightning_clip.functional.thresholds import (
    MODES,
    MeanThreshold,
    PercentileThreshold,
    ThresholdRule,
    ZScoreThreshold,
    make_rule,
)

__all__ = [
    "EPS",
    "MODES",
    "AdaGCRule",
    "CautiousMeanThreshold",
    "DivergenceDetector",
    "LossAwareMeanThreshold",
    "LossBand",
    "MeanPerTensorRule",
    "MeanThreshold",
    "PerTensorScaler",
    "PercentileThreshold",
    "ThresholdRule",
    "ZScoreThreshold",
    "all_finite",
    "band",
    "causes",
    "ceiling_applies",
    "clip_coef",
    "clip_grads_",
    "clipping",
    "collect_grads",
    "divergence",
    "gates",
    "grad_norms",
    "group_norms",
    "health",
    "make_rule",
    "norms",
    "per_tensor",
    "scale_grads_",
    "spectral_radius",
    "thresholds",
    "total_norm",
]
