"""The ``diffreg`` command: sample, train, ema, info, plugins, list."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import click
import torch

from diffreg import __version__, registry

# names of diffreg 0.1's cli module that stay importable from here
from diffreg.cli_support import image_grid, parse_labels, scatter_image, to_uint8_images  # noqa: F401
from diffreg.errors import (
    AmbiguousComponentError,
    CheckpointError,
    ComponentOptionError,
    ConfigError,
    PluginError,
    PluginWarning,
    SamplingError,
    UnknownComponentError,
)

MAX_SAMPLES = 10_000_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_USER_ERRORS = (
    UnknownComponentError,
    AmbiguousComponentError,
    ComponentOptionError,
    ConfigError,
    CheckpointError,
    PluginError,
    SamplingError,
    FileNotFoundError,
    FloatingPointError,
    ValueError,
    TypeError,
    ImportError,  # an optional dependency (diffusers) that is missing: the message says how to install it
)


def _user_errors(fn):
    """Turn exceptions into a one-line message and exit code 1 (``DIFFREG_DEBUG=1``: the traceback);
    SIGTERM and SIGHUP clean up and end the process by the signal
    (:func:`diffreg.fileio.cleanup_on_termination`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from diffreg.fileio import cleanup_on_termination

        try:
            # SIGTERM / SIGHUP unwind the command (temporary files removed, targets untouched), then
            # end the process by that signal (exit status 143 for SIGTERM)
            with cleanup_on_termination():
                return fn(*args, **kwargs)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except BrokenPipeError as exc:
            if not _from_echo(exc):  # a pipe the command writes to as an output: an error like any other
                raise _one_line(exc) from exc
            # the reader of our output went away (`diffreg info | head -2`): stop quietly, as shell
            # tools do (status 141 = 128 + SIGPIPE); stdout goes to /dev/null so the exit flush is quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except (Exception, SystemExit, GeneratorExit) as exc:  # SystemExit/GeneratorExit: from a component's code
            if os.environ.get("DIFFREG_DEBUG"):
                raise
            raise _one_line(exc) from exc

    return wrapper


def _from_echo(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while printing (click.echo) rather than writing a file."""
    return any(frame.name == "echo" and "click" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


_OOM_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate")


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or a RuntimeError in which an allocator reports no memory
    (CPU: "DefaultCPUAllocator: not enough memory" / "can't allocate memory"; MPS)."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def _plugin_at_fault(exc: BaseException) -> tuple[str, str] | None:
    """``("plugin 'name' (dist version), at file:line", name)`` if the innermost frame of ``exc``'s traceback
    that belongs to a loaded third-party plugin's package exists (the plugin's code raised it, or
    called what raised it), else None."""
    try:
        plugins = {
            p.module.split(".")[0]: p
            for p in registry.plugins()
            if p.distribution not in (None, "diffreg") and not p.module.startswith("diffreg")
        }
    except Exception:  # pragma: no cover - the registry itself is broken: no attribution
        return None
    found = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        plugin = plugins.get(str(frame.f_globals.get("__name__", "")).split(".")[0])
        if plugin is not None:
            found = (
                f"plugin {plugin.name!r} ({plugin.distribution} {plugin.version}), at {frame.f_code.co_filename}:{lineno}",
                plugin.name,
            )
    return found


#: what lowers the memory a command needs, by command name (default: --batch-size)
_MEMORY_HINTS = {
    "optimize-steps": "lower --draws or --reference-steps (or use a smaller model)",
    "info": "the file's header is too large to read",
}


def _memory_hint() -> str:
    """The flag that lowers the running command's memory (its name from click's context)."""
    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else None
    return _MEMORY_HINTS.get(name, "lower --batch-size (or use a smaller model or data size)")


def _one_line(exc: BaseException) -> click.ClickException:
    """The library's user-facing errors as they are, OS errors in the OS's own words (permissions,
    full disk, names too long), running out of memory with the fix, a plugin's fault (an unexpected
    exception, ``sys.exit`` or ``GeneratorExit`` from its code) naming the plugin, anything else as
    unexpected."""
    if isinstance(exc, (SystemExit, GeneratorExit)):
        where = _plugin_at_fault(exc)
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        origin = where[0] if where else (f"code at {last[0].filename}:{last[0].lineno}" if last else "a component's code")
        what = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else "GeneratorExit"
        return click.ClickException(
            f"{origin} raised {what} before the command finished (what it did not write yet was not written); "
            "a component must raise an exception, not exit"
            + (f": report it to the plugin's authors, or leave it out with DIFFREG_DISABLE_PLUGINS={where[1]}" if where else "")
        )
    if _is_out_of_memory(exc):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return click.ClickException(f"out of memory ({detail[:200]}); {_memory_hint()}")
    if isinstance(exc, _USER_ERRORS):
        return click.ClickException(str(exc))
    if isinstance(exc, OSError):
        from diffreg.fileio import shown

        name = shown(exc.filename) if exc.filename else ""
        return click.ClickException(f"{exc.strerror or exc}: {name}".rstrip(": "))
    where = _plugin_at_fault(exc)
    if where is not None:
        return click.ClickException(
            f"{where[0]}: {type(exc).__name__}: {exc} (a fault in that plugin: report it to its authors, or leave "
            f"it out with DIFFREG_DISABLE_PLUGINS={where[1]}; DIFFREG_DEBUG=1 shows the traceback)"
        )
    return click.ClickException(
        f"unexpected {type(exc).__name__}: {exc} (set DIFFREG_DEBUG=1 for the traceback, and please report it)"
    )


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_python_formatwarning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """diffreg's own warnings (plugins, environment lists, options) as ``warning: <message>``, one
    line without the source path; other libraries' warnings as Python formats them."""
    if issubclass(category, PluginWarning) or str(filename).startswith(_PACKAGE_DIR):
        return f"warning: {message}\n"
    return _python_formatwarning(message, category, filename, lineno, line)


@click.group()
@click.version_option(__version__, prog_name="diffreg")
def main() -> None:
    """Diffusion models where every part is a plugin chosen by name."""
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    click.get_current_context().call_on_close(lambda: setattr(warnings, "formatwarning", previous))


# -- plugins and list -----------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def plugins(as_json: bool) -> None:
    """Loaded plugins (distribution, version, what each registered), then name collisions (a bare
    name several plugins registered), then the failed plugins."""
    loaded = registry.plugins()
    failed = registry.failures()
    collisions = registry.default_registry().collisions()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "plugins": [
                        {
                            "name": p.name,
                            "distribution": p.distribution,
                            "version": p.version,
                            "module": p.module,
                            "aliases": list(p.aliases),
                            "components": [
                                {"kind": c.kind, "name": c.name, "qualified_name": c.qualified_name}
                                for c in p.components
                            ],
                        }
                        for p in loaded
                    ],
                    "collisions": [
                        {"kind": kind, "name": name, "qualified_names": [c.qualified_name for c in cs]}
                        for (kind, name), cs in collisions.items()
                    ],
                    "failed": [
                        {"name": f.name, "distribution": f.distribution, "version": f.version, "reason": f.reason}
                        for f in failed
                    ],
                },
                indent=2,
            )
        )
        return
    for p in loaded:
        also = f"  also named: {', '.join(p.aliases)}" if p.aliases else ""
        click.echo(f"{p.name}  ({p.distribution or '?'} {p.version or ''}){also}".rstrip())
        by_kind: dict[str, list[str]] = {}
        for c in p.components:
            by_kind.setdefault(c.kind, []).append(c.name)
        for kind, names in by_kind.items():
            click.echo(f"  {kind:<17} {', '.join(names)}")
    if collisions:
        click.echo("\nname collisions (a bare name goes to the built-in, else is an error; use a qualified name):")
        for (kind, name), cs in collisions.items():
            click.echo(f"  {kind} {name!r}: {', '.join(c.qualified_name for c in cs)}")
    if failed:
        click.echo("\nfailed plugins:")
        for f in failed:
            click.echo(f"  {f.name}  ({f.distribution or '?'} {f.version or ''}): {f.reason}")


@main.command(name="list")
@click.argument("kind", required=False, type=click.Choice(registry.KINDS))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def list_components(kind: str | None, as_json: bool) -> None:
    """Registered components (of KIND, or all), by qualified name, with their source."""
    comps = registry.components(kind)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "kind": c.kind,
                        "name": c.name,
                        "qualified_name": c.qualified_name,
                        "distribution": c.distribution,
                        "version": c.version,
                        "metadata": {
                            k: v for k, v in c.metadata.items() if isinstance(v, (str, int, float, bool, type(None)))
                        },
                    }
                    for c in comps
                ],
                indent=2,
            )
        )
        return
    current = None
    for c in comps:
        if c.kind != current:
            current = c.kind
            click.echo(f"{c.kind}:")
        meta = ", ".join(f"{k}={v}" for k, v in c.metadata.items())
        click.echo(f"  {c.qualified_name:<32} {c.distribution or '?'} {c.version or ''}  {meta}".rstrip())


# -- sample -------------------------------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    # `python -m diffreg.cli`: run the group of the imported module, on which every command is registered
    from diffreg.cli import main as _main

    sys.exit(_main())
else:  # the commands of their own modules register on `main` when imported
    from diffreg import cli_info, cli_sample, cli_tools  # noqa: F401
    from diffreg.cli_choices import _check_outputs, _parse_options  # noqa: F401
    from diffreg.cli_sample import sample  # noqa: F401
    from diffreg.cli_tools import apply_settings, train  # noqa: F401
