"""``serve`` and ``t24-sim``: the commands that run servers."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn
from rich.console import Console

from regstream import logs
from regstream.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

console = Console(stderr=True, soft_wrap=True)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command("t24-sim")(t24_sim)


def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="server processes on one port")] = 1,
    demo: Annotated[
        bool,
        typer.Option(help="load demo registrations and create a demo admin in an empty database"),
    ] = False,
) -> None:
    """Run the service (embedded Redis and T24 simulator unless configured)."""
    from regstream.cli.database import run_on_database
    from regstream.stack import DataDirInUse, EmbeddedStack, national_id_keys

    settings = settings_or_exit()
    logs.configure(settings.log_level, json_format=settings.log_json, levels=settings.log_levels)
    try:
        stack = EmbeddedStack(settings).__enter__()
    except DataDirInUse as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        console.print(
            f"[red]error:[/red] could not start embedded services: {exc}", highlight=False
        )
        raise typer.Exit(1) from None
    try:
        resolved = stack.settings
        # Workers (and the app factory) read the resolved addresses from the environment.
        if stack.redis is not None and resolved.effective_redis_url:
            # only the embedded server's: a configured Redis (URL, REDIS_HOST or Sentinel) is
            # in the environment already, and REDIS_URL next to REDIS_SENTINELS is refused
            os.environ["REDIS_URL"] = resolved.effective_redis_url
        if resolved.t24_base_url:
            os.environ["T24_BASE_URL"] = resolved.t24_base_url
        os.environ["REGSTREAM_DATA_DIR"] = str(resolved.data_dir)
        key = national_id_keys(resolved).current
        if resolved.secret_key is None:  # the embedded default: generated into the data dir
            os.environ["REGSTREAM_SECRET_KEY"] = key.decode()
        run_on_database(
            resolved, lambda engine: _prepare(engine, resolved, key, demo), failure="start-up"
        )
        where = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        console.print(f"[bold green]regstream[/bold green] listening on [bold]{where}[/bold]"
                      f"  (API docs: {where}/docs, stream: {where}/api/registrations/updates/stream)",
                      highlight=False)  # fmt: skip
        if where != "http://127.0.0.1:8000":  # the CLI clients' default --url
            console.print(f"  for the CLI: export REGSTREAM_URL={where}", highlight=False,
                          soft_wrap=True)  # fmt: skip
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; turn that into a normal
        # exit so the `finally` below stops the embedded Redis and simulator.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        signal.signal(signal.SIGINT, _exit_cleanly)
        uvicorn.run(
            "regstream.app:create_app_from_env",
            factory=True, host=host, port=port, workers=workers, loop="uvloop", http="httptools",
            log_config=None, access_log=False, timeout_graceful_shutdown=int(resolved.shutdown_grace) + 5,
            # X-Forwarded-* only from a proxy we were told to trust (docs/security.md)
            proxy_headers=resolved.trust_proxy,
        )  # fmt: skip
    finally:
        stack.__exit__(None, None, None)


def _exit_cleanly(_sig: int, _frame: object) -> None:
    raise SystemExit(0)


async def _prepare(engine: AsyncEngine, settings: Settings, key: bytes, demo: bool) -> None:
    """Migrate once in the parent (workers then find the schema at head; or check it is at head
    with REGSTREAM_MIGRATE_ON_START=false) and load demo data."""
    from regstream.db.engine import create_session_factory, prepare_schema

    await prepare_schema(engine, migrate_on_start=settings.migrate_on_start)
    if demo:
        from regstream.demo import load_demo

        rows = await load_demo(create_session_factory(engine), key)
        for row in rows:
            console.print(f"  demo registration [bold]{row.registration_id}[/bold]: {row.scenario}"
                          f" → expect {row.expected_status}", highlight=False)  # fmt: skip
        if not rows:
            console.print("  demo data not loaded: the database already has registrations")
        from regstream.cli.users_commands import ensure_demo_admin

        async with create_session_factory(engine).begin() as session:
            sign_in = await ensure_demo_admin(session)
        if sign_in is not None:
            # printed once: only the hash is stored (reset: regstream users passwd demo)
            name, password, token = sign_in
            console.print(
                f"  demo sign-in: user [bold]{name}[/bold]  password [bold]{password}[/bold]"
                "  (admin; shown once)",
                highlight=False,
                soft_wrap=True,
            )
            console.print(
                f"  for the CLI: export REGSTREAM_TOKEN={token}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print("  demo sign-in not created: users exist (regstream users list)")


def t24_sim(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8700,
    latency_ms: Annotated[float, typer.Option(min=0, help="added latency per call")] = 50.0,
    fault_rate: Annotated[
        float, typer.Option(min=0, max=1, help="share of calls answering 500")
    ] = 0.0,
    cob: Annotated[
        bool, typer.Option(help="start in close-of-business (maintenance) mode")
    ] = False,
    seed: Annotated[int, typer.Option(help="random seed for fault injection")] = 24,
    holdings_v4: Annotated[
        bool, typer.Option(help="answer account lists in the holdings v4 shape")
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="serve HTTPS: PEM certificate")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="its PEM private key")
    ] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="require client certificates signed by this CA"
        ),
    ] = None,
) -> None:
    """Run the T24 (Temenos Transact) REST simulator standalone."""
    from regstream.core_banking.simulator import SimulatorConfig, SimulatorTls, run_simulator

    if (tls_cert is None) != (tls_key is None) or (client_ca is not None and tls_cert is None):
        console.print("[red]error:[/red] --tls-cert and --tls-key go together; --client-ca "
                      "needs them", highlight=False)  # fmt: skip
        raise typer.Exit(2)
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = SimulatorTls(cert=tls_cert, key=tls_key, client_ca=client_ca)
    logs.configure(os.environ.get("REGSTREAM_LOG_LEVEL", "INFO"))
    scheme = "https" if tls is not None else "http"
    console.print(f"T24 simulator on {scheme}://{host}:{port}/api/v1.0.0", highlight=False)
    run_simulator(
        host,
        port,
        SimulatorConfig(
            latency_ms=latency_ms, fault_rate=fault_rate, cob=cob, seed=seed,
            holdings_v4=holdings_v4,
        ),
        tls=tls,
    )  # fmt: skip
