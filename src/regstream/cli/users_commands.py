"""``users add|list|disable|passwd``: manage back-office accounts in the database ``serve`` uses.

They read the same settings (``DATABASE_URL``, ``REGSTREAM_DATA_DIR``) as ``serve``, migrate the
schema if needed (unless ``REGSTREAM_MIGRATE_ON_START=false``: then they refuse a schema not at
head), and print no secret except the one new API token asked for with ``--token``
(alone on its own line, on stdout, so ``TOKEN=$(regstream users add ci --role operator --token
--password-stdin < pw)`` works). Disabling a user revokes its sessions and tokens; a running
server closes the user's open streams within one ping interval.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from regstream.auth import credentials, passwords
from regstream.auth.principal import Role
from regstream.cli.database import run_on_database
from regstream.config import Settings
from regstream.db import accounts, audit
from regstream.db.engine import create_session_factory, prepare_schema

err = Console(stderr=True)
out = Console()
users_app = typer.Typer(help="Manage back-office users (viewer, operator, admin).",
                        no_args_is_help=True)  # fmt: skip

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")


def _settings() -> Settings:
    from regstream.cli.server_commands import settings_or_exit

    return settings_or_exit()


def _run(command: str, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """``work`` in one transaction on the migrated (or checked) database, for ``users command``."""
    settings = _settings()

    async def in_transaction(engine: AsyncEngine) -> T:
        await prepare_schema(engine, migrate_on_start=settings.migrate_on_start)
        async with create_session_factory(engine).begin() as session:
            return await work(session)

    return run_on_database(settings, in_transaction, failure=f"users {command}")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    try:
        passwords.check_strength(password)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return password


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="user name (lower-case letters, digits, . _ -)")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "operator",
    token: Annotated[bool, typer.Option("--token", help="also print a new API token")] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin (scripts)")
    ] = False,
    no_password: Annotated[
        bool, typer.Option("--no-password", help="API tokens only; cannot sign in to pages")
    ] = False,
) -> None:
    """Create a user (asks for its password twice, hidden)."""
    try:
        username = credentials.check_username(name)
        parsed = credentials.parse_role(role)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if no_password and not token:
        raise _fail("--no-password needs --token (the user could not authenticate at all)")
    password = None if no_password else _read_password(password_stdin)

    async def work(session: AsyncSession) -> str | None:
        try:
            operator = await credentials.create_operator(
                session, username=username, role=parsed, password=password
            )
        except ValueError as exc:
            raise _fail(str(exc)) from None
        await audit.create(session, action="user.create", outcome="ok", actor="cli",
                           target=f"user:{username}", details={"role": parsed.value})  # fmt: skip
        if not token:
            return None
        value, _ = await credentials.issue_api_token(session, operator=operator, label="cli")
        return value

    value = _run("add", work)
    err.print(f"created user [bold]{username}[/bold] with role {parsed.value}", highlight=False)
    if value is not None:
        err.print("API token (shown once):")
        print(value, flush=True)


@users_app.command("list")
def list_users() -> None:
    """List users and their roles (no secrets)."""

    async def work(session: AsyncSession) -> list[tuple[str, str, str, str]]:
        return [
            (o.username, o.role, "disabled" if o.disabled else "active",
             "yes" if o.password_hash else "no")
            for o in await accounts.list_all(session)
        ]  # fmt: skip

    rows = _run("list", work)
    table = Table("user", "role", "status", "password")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@users_app.command("disable")
def disable(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Disable a user and revoke its sessions and API tokens."""

    async def work(session: AsyncSession) -> None:
        operator = await accounts.get_by_username(session, username=name.strip().lower())
        if operator is None:
            raise _fail(f"no user {name.strip().lower()!r}")
        await accounts.update_operator(session, operator=operator, disabled=True)
        await accounts.revoke_all(session, operator_id=operator.id, now_ms=credentials.now_ms())
        await audit.create(session, action="user.update", outcome="ok", actor="cli",
                           target=f"user:{operator.username}",
                           details={"disabled": True})  # fmt: skip

    _run("disable", work)
    err.print(f"disabled [bold]{name.strip().lower()}[/bold]; its sessions and tokens are revoked",
              highlight=False)  # fmt: skip


@users_app.command("passwd")
def passwd(
    name: Annotated[str, typer.Argument(help="user name")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
) -> None:
    """Set a user's password (asks twice, hidden)."""
    password = _read_password(password_stdin)

    async def work(session: AsyncSession) -> None:
        operator = await accounts.get_by_username(session, username=name.strip().lower())
        if operator is None:
            raise _fail(f"no user {name.strip().lower()!r}")
        hashed = await passwords.hash_password_async(password)
        await accounts.update_operator(session, operator=operator, password_hash=hashed)
        await audit.create(session, action="user.passwd", outcome="ok", actor="cli",
                           target=f"user:{operator.username}")  # fmt: skip

    _run("passwd", work)
    err.print(f"password set for [bold]{name.strip().lower()}[/bold]", highlight=False)


async def ensure_demo_admin(session: AsyncSession) -> tuple[str, str, str] | None:
    """For ``serve --demo``: create ``demo`` (admin, random password, one API token for the CLI)
    when there are no users.

    Returns ``(name, password, token)`` to print once, or ``None`` when users exist already.
    """
    if await accounts.count(session):
        return None
    password = secrets.token_urlsafe(12)
    operator = await credentials.create_operator(
        session, username="demo", role=Role.ADMIN, password=password
    )
    token, _ = await credentials.issue_api_token(session, operator=operator, label="demo cli")
    await audit.create(session, action="user.create", outcome="ok", actor="serve --demo",
                       target="user:demo", details={"role": "admin"})  # fmt: skip
    return "demo", password, token
