"""The ``regstream`` command (Typer + Rich)."""

from __future__ import annotations

import typer

from regstream.cli import client_commands, db_commands, server_commands, users_commands

app = typer.Typer(
    name="regstream",
    help="Validate mobile-banking registrations against T24 and watch every step live.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_commands.register(app)
db_commands.register(app)
client_commands.register(app)
users_commands.register(app)
