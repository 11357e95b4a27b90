"""Whether a clipping threshold bounds an optimizer's step (`ceiling_applies`).

No Lightning here, and no tensors: the answer is read from the optimizer's ``defaults`` once, at fit start.

A clipping threshold bounds the length of the step only for an optimizer whose step is proportional to the
gradient (SGD, with or without momentum). An optimizer that normalises the gradient by its own running
scale (Adam, AdamW, RMSprop, Adagrad, Lion, ...) takes the same step whatever uniform factor the gradients
were scaled by: a ceiling cannot shorten its step, and a ceiling that stays far below the norms only
distorts its moment estimates (a GAN's generator clipped to 2e-4 of its norms collapsed). Where
`ceiling_applies` says no, ``AdaptiveGradientClipping`` uses the plain
`~lightning_clip.functional.thresholds.MeanThreshold` instead of the loss-aware
`~lightning_clip.functional.ceiling.LossAwareMeanThreshold`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["NORMALISING_KEYS", "ceiling_applies"]

NORMALISING_KEYS = ("eps", "betas", "etas")
"""An optimizer whose ``defaults`` hold one of these normalises the gradient's scale (Adam's family,
RMSprop, Adagrad, Adadelta, Adafactor, Lion, Rprop, ...): its step does not follow a uniform rescaling."""


def ceiling_applies(defaults: Mapping[str, Any]) -> bool:
    """Whether a clipping threshold bounds the step of an optimizer with these ``defaults``
    (``optimizer.defaults``): True for SGD-like optimizers, whose step is proportional to the gradient;
    False for those that normalise its scale (`NORMALISING_KEYS`).

    Examples:
        >>> import torch
        >>> w = [torch.nn.Parameter(torch.zeros(1))]
        >>> ceiling_applies(torch.optim.SGD(w, lr=0.1, momentum=0.9).defaults)
        True
        >>> ceiling_applies(torch.optim.AdamW(w).defaults), ceiling_applies(torch.optim.RMSprop(w).defaults)
        (False, False)
    """
    return not any(key in defaults for key in NORMALISING_KEYS)
