"""Exponential moving averages of a model's weights: the classic EMA with warm-up, and EDM2's
power-function EMA with post-hoc reconstruction of an EMA of any length (Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3 and appendix C).

A power-function EMA with exponent gamma averages the weights theta_tau of steps tau <= t with the
profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1): after update t (1-based) it is
``ema = beta ema + (1 - beta) theta`` with beta = (1 - 1/t)^(gamma + 1). Its relative standard
deviation (the profile's std over t) is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

Training keeps such averages for a few sigma_rel values and writes them every N steps as
*snapshots* (``<output stem>.phema/step-<step>.safetensors``). Afterwards an EMA of any sigma_rel
at any snapshot time is the linear combination of snapshots whose profile is closest in L2 to the
wanted one: the normal equations A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_target>, where
<p_a, p_b> = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_a / t_b)^g_b / t_b for t_a <= t_b.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

SNAPSHOT_SUFFIX = ".phema"
_SNAPSHOT_NAME = re.compile(r"step-(\d+)\.safetensors")


class EMA:
    """Exponential moving average of a model's parameters, with warm-up (the decay at update k is
    min(decay, (1 + k) / (10 + k)), so early averages are not dominated by the initialization)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s parameters (buffers are copied)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # type: ignore[arg-type]
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the power-function EMA whose relative std is ``sigma_rel``: the
    largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (EDM2, eq. 3 solved
    for gamma).

    Raises:
        ValueError: ``sigma_rel`` not a finite number in (0, 1/sqrt(12)) (1/sqrt(12) ~ 0.2887 is
        gamma = 0, a plain average of all steps).
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < 12**-0.5:
        raise ValueError(
            f"sigma_rel must be a number in (0, 0.2887) (1/sqrt(12) is a plain average), got {sigma_rel!r}"
        )
    inv = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = integral over tau of the two power profiles (module docstring)."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b) ** gamma_b / t_b


def posthoc_coefficients(snapshots: list[tuple[float, float]], t: float, gamma: float) -> np.ndarray:
    """float64 ``[len(snapshots)]``: the least-squares weights x with sum_i x_i p_i closest to the
    profile (``t``, ``gamma``), for snapshots given as ``(t_i, gamma_i)``: solves A x = b
    (``numpy.linalg.lstsq``, so nearly dependent snapshots do not blow up)."""
    a = np.array([[profile_inner(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots])
    b = np.array([profile_inner(ti, gi, t, gamma) for ti, gi in snapshots])
    return np.linalg.lstsq(a, b, rcond=1e-12)[0]


class PowerEMA:
    """Power-function EMAs of a model's parameters for several ``sigma_rels`` (EDM2 keeps 0.05 and
    0.10); buffers are copied. ``models[i]`` is the average for ``sigma_rels[i]``."""

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...] | list[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        """Fold in ``model`` as update ``t`` (1-based: t = 1 copies it): beta = (1 - 1/t)^(gamma + 1)."""
        params = [p.detach() for p in model.parameters()]
        for gamma, average in zip(self.gammas, self.models, strict=True):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
            torch._foreach_lerp_(list(average.parameters()), params, 1.0 - beta)  # type: ignore[arg-type]
            for b_ema, b in zip(average.buffers(), model.buffers(), strict=True):
                b_ema.copy_(b)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<i>/<name>": tensor}`` of every average (CPU, contiguous)."""
        return {
            f"{i}/{k}": v.detach().cpu().contiguous()
            for i, average in enumerate(self.models)
            for k, v in average.state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors`."""
        for i, average in enumerate(self.models):
            average.load_state_dict({k[len(f"{i}/") :]: v for k, v in tensors.items() if k.startswith(f"{i}/")})


def snapshot_dir(output: str | os.PathLike[str]) -> Path:
    """Where a run writing ``output`` keeps its post-hoc EMA snapshots: ``<output stem>.phema/``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + SNAPSHOT_SUFFIX)


def write_snapshot(folder: Path, phema: PowerEMA, step: int) -> Path:
    """Write the averages at ``step`` to ``folder/step-<step>.safetensors`` (atomically; the folder
    is created), with ``step``, ``sigma_rels`` and ``gammas`` in the header."""
    from safetensors.torch import save_file

    from diffreg.fileio import atomic_path, naming

    folder.mkdir(exist_ok=True)
    path = folder / f"step-{step:09d}.safetensors"
    metadata = {
        "diffreg.kind": "phema_snapshot",
        "step": str(step),
        "sigma_rels": json.dumps(list(phema.sigma_rels)),
        "gammas": json.dumps(list(phema.gammas)),
    }
    with atomic_path(path) as tmp, naming(path):
        save_file(phema.state_tensors(), str(tmp), metadata=metadata)
    return path


def reconstruct(
    folder: str | os.PathLike[str], sigma_rel: float, step: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The post-hoc EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's) from the
    snapshots in ``folder`` taken at or before ``step``: ``(state_dict, info)`` with float tensors
    accumulated in float64 and cast to their stored dtype (buffers from the last snapshot), and
    ``info`` = ``{"step", "sigma_rel", "gamma", "snapshots", "coefficients"}``.

    Raises:
        FileNotFoundError: no snapshot folder or no snapshots in it. ValueError: a bad
        ``sigma_rel``, a ``step`` before the first snapshot, a file that is not a snapshot.
    """
    from safetensors import safe_open

    from diffreg.checkpoint import read_metadata

    gamma = sigma_rel_to_gamma(sigma_rel)
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots: {str(root)!r} does not exist (train with posthoc_ema_every > 0)"
        )
    files = sorted((int(m.group(1)), root / m.group(0)) for m in map(_SNAPSHOT_NAME.fullmatch, os.listdir(root)) if m)
    if not files:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (step-*.safetensors) in {str(root)!r}")
    step = files[-1][0] if step is None else step
    files = [(s, f) for s, f in files if s <= step]
    if not files or step < 1:
        raise ValueError(
            f"step {step} is before the first snapshot; snapshots are at steps >= {files[0][0] if files else '?'}"
        )
    entries = []  # (t, gamma, file, index)
    for s, f in files:
        meta = read_metadata(f)
        if meta.get("diffreg.kind") != "phema_snapshot":
            raise ValueError(f"{str(f)!r} is not a post-hoc EMA snapshot")
        try:
            gammas = [float(g) for g in json.loads(meta["gammas"])]
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{str(f)!r}: its gammas entry is damaged ({type(exc).__name__}: {exc})") from None
        entries += [(float(s), g, f, i) for i, g in enumerate(gammas)]
    x = posthoc_coefficients([(t, g) for t, g, _, _ in entries], float(step), gamma)
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coefficient, (_, _, f, i) in zip(x, entries, strict=True):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # safe_open has no __iter__
                if not key.startswith(f"{i}/"):
                    continue
                name, value = key[len(f"{i}/") :], fh.get_tensor(key)
                if not value.is_floating_point():
                    out[name] = value  # integer buffers: the last snapshot's
                    continue
                dtypes[name] = value.dtype
                out[name] = out.get(name, 0) + float(coefficient) * value.double()
    state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in out.items()}
    info = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "snapshots": len(files), "coefficients": x.tolist()}
    return state, info
