"""``migrate`` and ``rotate-secret``: the database chores of a release and of a key rotation.

Both read the settings ``serve`` reads (``DATABASE_URL``, ``REGSTREAM_SECRET_KEY``, ...), print
what they did in one or two lines on stdout, and on failure one line on stderr with a non-zero
exit status (docs/operations.md).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from regstream.cli.server_commands import settings_or_exit

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
    app.command("rotate-secret")(rotate_secret)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def migrate() -> None:
    """Bring the database schema to this release's head (what a release pipeline runs once;
    safe while instances start or run: they take turns on a PostgreSQL advisory lock)."""
    from regstream.db.engine import create_engine
    from regstream.db.engine import migrate as run_migrations

    settings = settings_or_exit()

    async def main() -> str:
        engine = create_engine(settings.effective_database_url, pool_size=1)
        try:
            done = await run_migrations(engine)
        finally:
            await engine.dispose()
        waited = " (after waiting for another process's migration)" if done.waited else ""
        return done.describe() + waited

    try:
        line = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        err.print(f"[red]error:[/red] migration failed: {_one_line(exc)}")
        raise typer.Exit(1) from None
    out.print(line)


def rotate_secret(
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="users per transaction")] = 500,
) -> None:
    """Re-hash enrolled users' national ids with REGSTREAM_SECRET_KEY (those that match under
    REGSTREAM_PREVIOUS_SECRET_KEYS). Exit status 0: every user is on the current key and the
    previous keys can be retired; 1: some users still need them (counts printed)."""
    from regstream.db.engine import create_engine, create_session_factory, prepare_schema
    from regstream.db.key_rotation import Rotation, rotate
    from regstream.stack import national_id_keys

    settings = settings_or_exit()

    async def main() -> Rotation:
        engine = create_engine(settings.effective_database_url, pool_size=1)
        try:
            await prepare_schema(engine, migrate_on_start=settings.migrate_on_start)
            return await rotate(
                create_session_factory(engine), national_id_keys(settings), batch=batch
            )
        finally:
            await engine.dispose()

    try:
        done = asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        err.print(f"[red]error:[/red] rotate-secret failed: {_one_line(exc)}")
        raise typer.Exit(1) from None
    out.print(
        f"re-hashed {done.rehashed} enrolled users with the current key "
        f"({done.current} were on it already)"
    )
    if done.left:
        out.print(
            f"{done.left} users keep a hash of another key ({done.unlinked} with no registration "
            f"holding their national id, {done.unmatched} matching no configured key, "
            f"{done.conflicts} enrolled twice under two keys): keep REGSTREAM_PREVIOUS_SECRET_KEYS"
            " until they register again"
        )
        raise typer.Exit(1)
    out.print("every enrolled user is on the current key: the previous keys can be retired")
