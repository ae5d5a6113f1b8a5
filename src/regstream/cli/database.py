"""How a CLI command uses the database: ``run_on_database``, the one place that makes the engine.

``migrate``, ``rotate-secret``, ``users …`` and ``serve``'s start-up (migration, demo data) each
open one engine on the settings' database, do their work in one ``asyncio.run`` and dispose of
the engine however the work ends. They work one step at a time, so one pooled connection is
enough (``pool_size=1``; the engine may open one more). A failure ends the command with one line
on stderr and exit status 1, never a traceback (``users`` and ``serve`` printed one for anything
but a schema not at head, e.g. an unreachable database).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer

from regstream.cli.server_commands import console

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from regstream.config import Settings

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a failed command prints about its error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_on_database(
    settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]], *, failure: str
) -> T:
    """Run ``work`` with an engine on ``settings``' database and return what it returns.

    An error ends the command: a schema this release cannot use (``SchemaNotAtHead``:
    ``REGSTREAM_MIGRATE_ON_START=false`` before ``migrate``, or a newer release's schema) as
    ``error: <its message>`` (it says what to do), anything else as ``error: <failure> failed:
    <Type>: <first line>``, ``failure`` naming what the command does (``"migration"``).
    ``typer.Exit`` from ``work`` (a command's own refusal, already printed) passes through.
    """
    from regstream.db.engine import SchemaNotAtHead, create_engine

    async def main() -> T:
        engine = create_engine(settings.effective_database_url, pool_size=1)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        if isinstance(exc, SchemaNotAtHead):
            message = str(exc)
        else:
            message = f"{failure} failed: {one_line(exc)}"
        console.print(f"[red]error:[/red] {message}", highlight=False)
        raise typer.Exit(1) from None
