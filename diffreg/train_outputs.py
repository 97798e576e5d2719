"""The files a training run writes, and the checks made before it starts.

Where the training state of a run lives (:func:`state_path`), whether an output keeps files beside
it (:func:`keeps_files_beside`: not for ``/dev/null`` or a FIFO), and :func:`check_outputs`, which
:func:`diffreg.training.train` calls before any work.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffreg.errors import ConfigError
from diffreg.train_config import TrainConfig

STATE_SUFFIX = ".state.safetensors"


def state_path(output: str | os.PathLike[str]) -> Path:
    """Where the training state of a run writing ``output`` lives: ``<output stem>.state.safetensors``."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + STATE_SUFFIX)


def keeps_files_beside(output: str | os.PathLike[str]) -> bool:
    """Whether a run writing ``output`` keeps files beside it (the training state, post-hoc EMA
    snapshots): only for a regular file. An output that is written through
    (:func:`diffreg.fileio.writes_through`: ``/dev/null``, a FIFO, ``/dev/stdout``) has no folder of
    its own, so nothing is derived from its name (``/dev/null.state.safetensors`` would be a stray
    file in ``/dev``)."""
    from diffreg.fileio import writes_through

    return not writes_through(output)


def _not_a_file_note(output: str | os.PathLike[str]) -> str:
    return (
        f"the output {str(output)!r} is not a regular file: the checkpoint is written to it once, at the end; "
        "no training state is written beside it (so the run cannot be resumed) and save_every is ignored"
    )


def check_outputs(
    cfg: TrainConfig,
    output: str | os.PathLike[str],
    *,
    resume: bool = False,
    inputs: dict[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """What :func:`train` checks before any work: the checkpoint and its training state can be
    written (:func:`diffreg.fileio.check_writable`: an existing folder, not read-only, a name the
    file system takes, not a directory), neither is an input (``data.path``, or ``inputs`` such as
    the configuration file), and with ``resume`` the state exists and is behind ``cfg.steps``.
    An output that is not a regular file (``/dev/null``, a FIFO: :func:`keeps_files_beside`) gets
    no state file; it is refused with ``resume`` or ``posthoc_ema_every``, which need files beside it.

    Raises:
        ValueError: an output that is an input; ``resume`` or ``posthoc_ema_every`` with an output
        that is not a regular file. OSError / FileNotFoundError: an output that cannot be written,
        or no state to resume. ConfigError: ``cfg.steps`` not beyond the saved step.
    """
    from diffreg.fileio import check_writable, refuse_inputs_as_outputs
    from diffreg.train_state import saved_step

    state = state_path(output)
    named_inputs = dict(inputs or {})
    if cfg.data.options.get("path") is not None:
        named_inputs["data.path"] = str(cfg.data.options["path"])
    if not keeps_files_beside(output):
        why = f"the output {str(output)!r} is not a regular file (a device, FIFO or stream), so"
        if resume:
            raise ValueError(f"--resume: {why} there is no training state beside it; give the checkpoint file")
        if cfg.posthoc_ema_every:
            raise ValueError(
                f"posthoc_ema_every = {cfg.posthoc_ema_every}: {why} there is no folder beside it for the snapshots "
                "(<output stem>.phema/); give a regular file, or set posthoc_ema_every = 0"
            )
        refuse_inputs_as_outputs({"the output": output}, named_inputs)
        check_writable(output)
        return
    refuse_inputs_as_outputs({"the output": output, "its training state": state}, named_inputs)
    check_writable(output)
    check_writable(state)
    if resume:
        if not state.exists():
            raise FileNotFoundError(f"--resume: the training state {str(state)!r} does not exist")
        step = saved_step(state)
        if step is not None and cfg.steps <= step:
            raise ConfigError(
                f"--resume: the training state {str(state)!r} is at step {step} and steps is {cfg.steps}: "
                f"nothing to train (give steps > {step})"
            )
