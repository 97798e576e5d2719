"""Guidance (kind ``guidance``): how a conditional and an unconditional prediction combine.

A :class:`Guidance` receives, at one noise level, the conditional prediction and the unconditional
one (each a :class:`~diffreg.parameterization.Prediction`: ``pred_xstart`` and ``pred_eps``, raw:
before clipping or thresholding) and the scale, and returns the guided ``(pred_xstart, pred_eps)``.
The sampling context (:meth:`~diffreg.sampling.SamplingContext.denoise`) calls it between the
model and the sampler, so every sampler composes with every guidance by name.

**Scale convention** (diffreg's, Ho & Salimans 2022, eq. 6 written as uncond + w (cond - uncond)):
``w = 0`` is the unconditional model, ``w = 1`` the conditional one, ``w > 1`` guided (typically
1..20). Methods whose paper uses another convention say how theirs maps (CFG++'s lambda is
accepted in [0, 1] as it is).

Four class attributes describe a method to the context:

- :attr:`Guidance.identity_at_one`: ``w = 1`` gives the conditional model exactly (then the context
  makes no unconditional pass at ``w = 1``).
- :meth:`Guidance.active`: whether the method guides at a level (``interval`` does not outside its
  interval: then the context makes one conditional pass, no doubled batch).
- :attr:`Guidance.renoise_unconditional`: the sampler renoises with the unconditional eps (CFG++,
  Chung et al. 2024): ``x' = alpha' x0_guided + c eps_uncond``. Samplers that honour it declare
  ``supports_unconditional_renoise = True`` and read ``ctx.renoise(x, pred)``.
- :attr:`Guidance.separate_unconditional`: the unconditional prediction comes from somewhere other
  than the same model with the null condition (autoguidance's guide model); the method then
  implements :meth:`Guidance.unconditional`.

Per-call state (APG's momentum) lives in the :class:`GuidanceCall` the context makes for each
sampling call, never on the guidance object, so one object serves concurrent calls.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from diffreg import registry
from diffreg.parameterization import Prediction
from diffreg.process import NoiseLevel
from diffreg.validation import check_finite_number

if TYPE_CHECKING:
    from diffreg.sampling.context import SamplingContext

Eps = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class GuidanceCall:
    """The guidance's state for one sampling call (made by the context, passed to every
    :meth:`Guidance.combine`).

    Attributes:
        scale: the guidance scale w of the call (a float). levels: the call's grid
            :class:`~diffreg.sampling.Levels`. state: a dict the method may fill (APG's running
            average, a guide model moved to the call's device).
    """

    scale: float
    levels: Any
    state: dict[str, Any] = field(default_factory=dict)


class Guidance(abc.ABC):
    """Base class of guidance methods (kind ``guidance``). Implement :meth:`combine`.

    Class attributes: ``identity_at_one`` (w = 1 is the conditional model), ``renoise_unconditional``
    (CFG++: samplers renoise with the unconditional eps), ``separate_unconditional`` (the
    unconditional prediction comes from :meth:`unconditional`, not from the same model's null
    condition), ``scale_range`` (inclusive bounds of accepted scales, with a text for errors).
    """

    identity_at_one: bool = True
    renoise_unconditional: bool = False
    separate_unconditional: bool = False
    scale_range: tuple[float, float, str] = (0.0, 1e4, "0..10000 (0: unconditional, 1: conditional, above 1: guided, typically 1..20)")

    def check_scale(self, scale: Any) -> float:
        """``scale`` as a float if this method accepts it.

        Raises:
            TypeError: not a number. ValueError: NaN, infinite or outside :attr:`scale_range`.
        """
        w = check_finite_number(scale, "guidance_scale")
        low, high, text = self.scale_range
        if not low <= w <= high:
            raise ValueError(f"guidance_scale {scale!r} is out of range for {self!r}; accepted: {text}")
        return w

    def active(self, level: NoiseLevel, call: GuidanceCall) -> bool:
        """Whether to guide at ``level`` (a Python bool from the level's floats, never from tensor
        values). Where ``False`` the context makes one conditional pass and uses it unchanged."""
        return True

    def start(self, ctx: SamplingContext, call: GuidanceCall) -> None:
        """Called once per sampling call before the first step (fill ``call.state``)."""

    def unconditional(self, ctx: SamplingContext, x: torch.Tensor, at: Any, level: NoiseLevel, call: GuidanceCall) -> Prediction:
        """The unconditional (guiding) prediction at ``level``, for methods with
        ``separate_unconditional = True``.

        Raises:
            NotImplementedError: the method declares a separate unconditional but does not give it.
        """
        raise NotImplementedError(f"{type(self).__name__} declares separate_unconditional but implements no unconditional()")

    @abc.abstractmethod
    def combine(
        self, cond: Prediction, uncond: Prediction, x: torch.Tensor, level: NoiseLevel, call: GuidanceCall
    ) -> tuple[torch.Tensor, Eps]:
        """The guided ``(pred_xstart, pred_eps)`` (``x``'s shape and dtype; ``pred_eps`` may be a
        zero-argument function, computed when a sampler asks for it).

        Args:
            cond, uncond: the conditional and unconditional predictions at ``level`` (raw: before
                clipping); ``x``: the state ``[N, ...]``; ``level``: its noise level (alpha, sigma
                Python floats); ``call``: the call's scale and state.
        """

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        name = getattr(self, "name", "") or type(self).__name__
        return f"{name}({options})"


def lerp(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """uncond + w (cond - uncond) (one fused kernel)."""
    return torch.lerp(uncond, cond, w)


def resolve_guidance(
    guidance: str | Mapping[str, Any] | Guidance | None, options: Mapping[str, Any] | None = None
) -> Guidance | None:
    """A :class:`Guidance` from a registered name, ``{"name": ..., **options}``, or an instance;
    ``options`` (``guidance_options=``) are added to the name's or the dict's options.

    Raises:
        UnknownComponentError / ComponentOptionError: an unknown name or option (naming it).
        TypeError: anything else, an option given twice, or options with a built instance.
    """
    options = dict(options or {})
    if guidance is None:
        if options:
            raise TypeError(f"guidance_options {sorted(options)} given without guidance= (a method name such as 'cfg')")
        return None
    if isinstance(guidance, Guidance):
        if options:
            raise TypeError(f"unexpected guidance_options {sorted(options)} for an already-built guidance {guidance!r}")
        return guidance
    if isinstance(guidance, str):
        return registry.create("guidance", guidance, **options)
    if isinstance(guidance, Mapping):
        spec = dict(guidance)
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise TypeError(f"a guidance given as a dict needs a 'name' such as 'cfg', got {guidance!r}")
        both = sorted(set(spec) & set(options))
        if both:
            raise TypeError(f"guidance option(s) {both} given both in guidance= and guidance_options=")
        return registry.create("guidance", name, **spec, **options)
    raise TypeError(
        f"guidance must be a registered name (such as 'cfg'), a dict with 'name', or a Guidance, got {guidance!r}"
    )




class GuidedPrediction(Prediction):
    """A :class:`~diffreg.parameterization.Prediction` that also carries ``renoise_eps``, the
    unconditional eps a sampler renoises with under CFG++ (read it through
    :meth:`~diffreg.sampling.SamplingContext.renoise`)."""

    __slots__ = ("renoise_eps",)

    @classmethod
    def of(cls, pred: Prediction, renoise_eps: torch.Tensor) -> GuidedPrediction:
        """``pred`` with ``renoise_eps`` (same tensors, nothing copied)."""
        out = cls(
            pred.pred_xstart,
            pred._pred_eps,
            pred._log_variance,
            pred._variance,
            variances=pred._variances,
            alpha=pred.alpha,
            sigma=pred.sigma,
            model_eps=pred._model_eps,
        )
        out.renoise_eps = renoise_eps
        return out


__all__ = ["Guidance", "GuidanceCall", "GuidedPrediction", "lerp", "resolve_guidance"]
