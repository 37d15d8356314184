"""How the ``fedlite`` command line dispatches: bad input shown as a message, not a traceback; a group
whose first argument may be its default command's (``fedlite export CKPT``, ``fedlite bench BUNDLE``);
subcommands imported only when they run, so ``fedlite --help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fedlite.errors import InputError


class FedliteGroup(click.Group):
    """Shows bad input as a plain message (no traceback) and exits 2; real bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


class DefaultCommandGroup(FedliteGroup):
    """A group whose first argument, when it names no subcommand, goes to ``default_command``:
    ``fedlite export CKPT`` beside ``fedlite export verify BUNDLE``. A directory holding
    ``default_marker`` goes there too, whatever it is called. ``lazy`` subcommands (name → module
    with a ``main`` command, and a line of help) are imported only when they run."""

    default_command = ""
    default_marker = ""
    lazy: dict[str, tuple[str, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy]

    def get_command(self, ctx: click.Context, name: str):
        if name in self.lazy:
            import importlib

            return importlib.import_module(self.lazy[name][0]).main
        return super().get_command(ctx, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = args[0] if args else None
        if first is not None and first not in ctx.help_option_names and (
                first not in self.list_commands(ctx)
                or (self.default_marker and (Path(first) / self.default_marker).is_file())):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command.get_short_help_str(formatter.width)) for name, command in self.commands.items()]
        rows += [(name, text) for name, (_, text) in self.lazy.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class ExportGroup(DefaultCommandGroup):
    default_command, default_marker = "build", "model.safetensors"


class BenchGroup(DefaultCommandGroup):
    default_command, default_marker = "measure", "bundle.json"
    lazy = {
        "federated": ("fedlite.bench.federated", "Training throughput of a few simulated federated rounds."),
        "frozen-rounds": ("fedlite.bench.frozen_rounds", "A site's frozen rounds with and without cached embeddings."),
        "poisoning": ("fedlite.bench.poisoning", "One poisoning site under FedAvg, median and trimmed mean."),
        "embedding-parity": ("fedlite.bench.embedding_parity", "Embeddings and calls of two bundles on one dataset."),
        "int8-saturation": ("fedlite.bench.int8_saturation", "How far INT8 moves from FP32 on this CPU, per preset."),
        "link-bytes": ("fedlite.bench.link_bytes", "Bytes and minutes per round on hospital links, per architecture."),
    }
