"""Commands with modes (``fedlite train``: federated, ``--centralized``, ``--edge``, ``--resume``;
``fedlite export``: on cases at the coordinator or ``--sites``): each option names the modes it acts
in, an option given in another mode is refused instead of silently ignored, and ``--help`` lists the
options in sections headed by the modes they apply to.
"""

from __future__ import annotations

from collections.abc import Callable

import click
from click.core import ParameterSource

from fedlite.errors import InputError


class ModeOption(click.Option):
    """A click option with a help section and the modes it acts in (empty: every mode)."""

    def __init__(self, *decls, section: str = "Options", modes: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*decls, **kwargs)
        self.section, self.modes = section, tuple(modes)


def option_section(title: str, modes: tuple[str, ...], *options: tuple[tuple, dict]) -> Callable:
    """Decorator: ``options`` (``opt(...)`` pairs) as one help section acting in ``modes``."""
    def apply(command: Callable) -> Callable:
        for decls, kwargs in reversed(options):
            command = click.option(*decls, cls=ModeOption, section=title, modes=modes, **kwargs)(command)
        return command
    return apply


def option_sections(*sections: Callable) -> Callable:
    """Decorator: ``option_section``s in the order given, as ``--help`` shows them."""
    def apply(command: Callable) -> Callable:
        for section in reversed(sections):
            command = section(command)
        return command
    return apply


def opt(*decls, **kwargs) -> tuple[tuple, dict]:
    """One option of an ``option_section``: click.option's arguments, kept for later."""
    return decls, kwargs


class ModalCommand(click.Command):
    """``modes`` maps each mode to the flag that selects it (None for the default mode), its name in
    messages, and why options stay out of it; at most one flag may be given."""

    def __init__(self, *args, modes: dict[str, tuple[str | None, str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.modes = modes

    def mode(self, ctx: click.Context) -> str:
        chosen = [name for name, (flag, *_) in self.modes.items() if flag and ctx.params.get(flag)]
        if len(chosen) > 1:
            flags = [self._option_name(self.modes[name][0]) for name in chosen]
            raise InputError(f"{' and '.join(flags)} pick different kinds of run", hint="give one of them")
        return chosen[0] if chosen else next(name for name, (flag, *_) in self.modes.items() if flag is None)

    def invoke(self, ctx: click.Context):
        mode = self.mode(ctx)
        for param in self.params:
            if (isinstance(param, ModeOption) and param.modes and mode not in param.modes
                    and ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT,
                                                                     ParameterSource.DEFAULT_MAP, None)):
                _, name, why = self.modes[mode]
                raise InputError(f"{param.opts[0]} does not apply to {name}{why}",
                                 hint=f"it applies to {' and '.join(self.modes[m][1] for m in param.modes)}; drop it")
        return super().invoke(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            heading = "Options"
            if isinstance(param, ModeOption):
                heading = param.section + (f" ({', '.join(param.modes)})" if param.modes else "")
            sections.setdefault(heading, []).append(record)
        sections["Options"] = sections.pop("Options", [])  # --help last, after the command's own sections
        for heading, rows in sections.items():
            if not rows:
                continue
            with formatter.section(heading):
                formatter.write_dl(rows)

    def _option_name(self, param_name: str) -> str:
        return next(p.opts[0] for p in self.params if p.name == param_name)
