"""A request's database session ends before its response is sent (a slow reader holds nothing)."""

from __future__ import annotations

import asyncio
from typing import Any

from regstream.app import create_app
from regstream.auth import credentials
from regstream.auth.principal import Role
from regstream.db import registrations
from tests.conftest import SettingsFactory
from tests.integration.test_data_layer import FIELDS


async def test_no_connection_is_held_while_a_response_is_sent(
    make_settings: SettingsFactory, database_url: str
) -> None:
    app = create_app(make_settings(database_url=database_url))
    async with app.api.router.lifespan_context(app.api):
        services = app.state.services
        async with services.sessions.begin() as session:
            operator = await credentials.create_operator(
                session, username="slow", role=Role.VIEWER, password=None
            )
            token, _ = await credentials.issue_api_token(session, operator=operator)
            row = await registrations.create(session, **FIELDS)
        pool = services.engine.sync_engine.pool
        # held for good: the work queue's LISTEN connection (PostgreSQL; pipeline/fleet.py)
        held = 1 if services.engine.dialect.name == "postgresql" else 0
        body_sent, release = asyncio.Event(), asyncio.Event()
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            await release.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif message["type"] == "http.response.body":
                body_sent.set()
                await release.wait()  # a client that does not read

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": f"/api/registrations/{row.id}", "raw_path": b"",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80), "headers": [(b"authorization", f"Bearer {token}".encode())],
        }  # fmt: skip
        request = asyncio.create_task(app(scope, receive, send))
        try:
            await asyncio.wait_for(body_sent.wait(), 10)
            assert statuses == [200]
            # background loops may check a connection out for a moment; the request must not
            for _ in range(100):
                if pool.checkedout() == held:
                    break
                await asyncio.sleep(0.01)
            assert pool.checkedout() == held, "the request still holds a database connection"
            async with asyncio.timeout(5), services.sessions.begin() as session:
                await registrations.create(session, **{**FIELDS, "customer_number": "999001"})
        finally:
            release.set()
            await asyncio.wait_for(request, 10)
