"""``migrate`` and ``rotate-secret``: the database chores of a release and of a key rotation.

Both read the settings ``serve`` reads (``DATABASE_URL``, ``REGSTREAM_SECRET_KEY``, ...), print
what they did in one or two lines on stdout, and on failure one line on stderr with a non-zero
exit status (docs/operations.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from regstream.cli.database import run_on_database
from regstream.cli.server_commands import settings_or_exit

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from regstream.db.key_rotation import Rotation

out = Console(soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
    app.command("rotate-secret")(rotate_secret)


def migrate() -> None:
    """Bring the database schema to this release's head (what a release pipeline runs once;
    safe while instances start or run: they take turns on a PostgreSQL advisory lock)."""
    from regstream.db.engine import migrate as run_migrations

    async def work(engine: AsyncEngine) -> str:
        done = await run_migrations(engine)
        waited = " (after waiting for another process's migration)" if done.waited else ""
        return done.describe() + waited

    out.print(run_on_database(settings_or_exit(), work, failure="migration"))


def rotate_secret(
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="users per transaction")] = 500,
) -> None:
    """Re-hash enrolled users' national ids with REGSTREAM_SECRET_KEY (those that match under
    REGSTREAM_PREVIOUS_SECRET_KEYS). Exit status 0: every user is on the current key and the
    previous keys can be retired; 1: some users still need them (counts printed)."""
    from regstream.db.engine import create_session_factory, prepare_schema
    from regstream.db.key_rotation import rotate
    from regstream.stack import national_id_keys

    settings = settings_or_exit()

    async def work(engine: AsyncEngine) -> Rotation:
        await prepare_schema(engine, migrate_on_start=settings.migrate_on_start)
        return await rotate(create_session_factory(engine), national_id_keys(settings), batch=batch)

    done = run_on_database(settings, work, failure="rotate-secret")
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
