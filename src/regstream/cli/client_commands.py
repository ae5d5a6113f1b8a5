"""``watch`` and ``process``: terminal clients of a running service."""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from regstream.cli.sse_client import StreamRefused, follow

console = Console()
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option(help="service base URL", envvar="REGSTREAM_URL")]
TokenOption = Annotated[
    str | None, typer.Option(help="API token (or REGSTREAM_TOKEN)", envvar="REGSTREAM_TOKEN")
]

_STYLE = {"APPROVED": "green", "COMPLETED": "green", "DUPLICATE": "yellow", "FAILED": "red"}


def register(app: typer.Typer) -> None:
    app.command()(watch)
    app.command()(process)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _clock(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000).strftime("%H:%M:%S.%f")[:-3]


def _print_update(update: dict[str, Any]) -> None:
    rid = update.get("registrationId")
    status = str(update.get("status"))
    when = _clock(update.get("timestamp"))
    if update.get("stage"):
        mark = {"started": "…", "completed": "✓", "failed": "✗"}.get(
            str(update.get("stageStatus")), "·"
        )
        console.print(f"{when}  #{rid}  {mark} [bold]{update['stage']}[/bold]  {update.get('message', '')}",
                      highlight=False)  # fmt: skip
    else:
        style = _STYLE.get(status, "white")
        details = update.get("details") or {}
        extra = ", ".join(f"{k}={v}" for k, v in details.items())
        console.print(f"{when}  #{rid}  [bold {style}]{status}[/bold {style}]  {update.get('message', '')}"
                      f"{'  (' + extra + ')' if extra else ''}", highlight=False)  # fmt: skip


def _stream_url(url: str, registration_id: int | None) -> str:
    base = url.rstrip("/") + "/api/registrations/updates/stream"
    return f"{base}?registrationId={registration_id}" if registration_id else base


def watch(
    registration_id: Annotated[int | None, typer.Option("--registration-id", "-r", min=1)] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Tail the live update stream (all registrations, or one)."""
    signal.signal(signal.SIGINT, _quit_now)
    try:
        _follow(_stream_url(url, registration_id), token, until_final=None)
    except httpx.TransportError as exc:
        # one line, like `process`: nothing listens there, a TLS or DNS failure, a dropped stream
        err.print(f"[red]error:[/red] cannot reach {url}: {type(exc).__name__} "
                  "(is the service running? set --url or REGSTREAM_URL)", soft_wrap=True)  # fmt: skip
        raise typer.Exit(1) from None


def _quit_now(_signum: int, _frame: object) -> None:
    """Ctrl-C ends ``watch`` at once, as it ends ``tail -f``. A KeyboardInterrupt raised wherever
    the stream reader happened to be could leave httpx's connection pool half closed, and the
    process then waited in its close (CI: ``watch`` still running 10 s after SIGINT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _follow(
    stream_url: str, token: str | None, until_final: int | None, on_connected: Any = None
) -> dict[str, Any] | None:
    timeout = httpx.Timeout(10.0, read=None)
    running = False  # this run of ``until_final`` was seen in progress (so an ended state is new)
    with httpx.Client(timeout=timeout, headers=_headers(token)) as client:
        try:
            for event in follow(client, stream_url):
                kind = event.get("type")
                if kind == "connected":
                    err.print(f"[dim]connected to {stream_url}[/dim]")
                    if on_connected is not None:
                        on_connected()
                elif kind == "update":
                    update = event.get("data") or {}
                    _print_update(update)
                    if until_final is not None and update.get("registrationId") == until_final:
                        if update.get("final"):
                            return dict(update)
                        running = True
                elif kind == "snapshot":
                    data = event.get("data") or {}
                    if until_final is not None and data.get("id") == until_final:
                        final = _final_of_snapshot(data)
                        if final is not None and running:  # ended while we were reconnecting
                            return final
                        running = running or bool(data.get("inProgress"))
                    for item in data.get("processLog") or []:
                        _print_update({"registrationId": data.get("id"), "status": "PENDING",
                                       "stageStatus": item.get("status"), **item})  # fmt: skip
                elif kind == "auth":
                    err.print("[red]credentials expired; sign in again[/red]")
                    raise typer.Exit(1)
        except StreamRefused as refused:
            err.print(f"[red]error:[/red] {refused}", soft_wrap=True)
            raise typer.Exit(1) from None
    return None


def _final_of_snapshot(data: dict[str, Any]) -> dict[str, Any] | None:
    """A snapshot of a registration that already ended, as its final update."""
    if data.get("inProgress") or data.get("status") in (None, "PENDING"):
        return None
    result = data.get("result") or {}
    return {
        "registrationId": data.get("id"), "status": data.get("status"), "final": True,
        "message": result.get("message", ""), "details": result.get("details") or {},
        "processLog": data.get("processLog") or [],
    }  # fmt: skip


def process(
    registration_id: Annotated[int, typer.Argument(min=1, help="registration id")],
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Validate one registration and show its progress until the final status."""
    import threading

    result: dict[str, Any] = {}
    ready = threading.Event()

    def follow() -> None:
        try:
            result["final"] = _follow(
                _stream_url(url, registration_id), token, until_final=registration_id,
                on_connected=ready.set,
            )  # fmt: skip
        except typer.Exit as exc:
            result["exit"] = exc.exit_code
        except httpx.HTTPError as exc:
            result["error"] = str(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    ready.wait(5)
    try:
        with httpx.Client(timeout=10.0, headers=_headers(token)) as client:
            response = client.post(
                url.rstrip("/") + f"/api/registrations/{registration_id}/process"
            )
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {type(exc).__name__} "
                  "(is the service running? set --url or REGSTREAM_URL)", soft_wrap=True)  # fmt: skip
        raise typer.Exit(1) from None
    if response.status_code != 202:
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        err.print(
            f"[red]error {response.status_code}:[/red] {body.get('message', response.text[:200])}"
        )
        raise typer.Exit(1)
    thread.join(float(os.environ.get("REGSTREAM_PROCESS_TIMEOUT", "120")))
    final = result.get("final")
    if not final:
        err.print("[red]no final status received[/red]")
        raise typer.Exit(1)
    table = Table(title=f"registration {registration_id}")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("message")
    for item in final.get("processLog") or []:
        table.add_row(str(item.get("stage")), str(item.get("status")), str(item.get("message")))
    console.print(table)
    raise typer.Exit(0 if final.get("status") != "FAILED" else 3)
