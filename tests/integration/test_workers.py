"""``serve --workers N``: every stream gets every matching update whichever worker ran the run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.embedded import EmbeddedRedis
from tests.integration.test_crash_and_shutdown import _env, _serve, _token
from tests.support import StreamClient, free_port


async def test_every_stream_gets_every_update_across_workers(
    tmp_path: Path, redis_server: EmbeddedRedis, t24: RunningSimulator
) -> None:
    env = _env(tmp_path, redis_server, t24, REGSTREAM_STREAMS_PER_USER="100")
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo", "--workers", "2"):
        headers = {"Authorization": f"Bearer {_token(log)}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as http:
            items = (await http.get("/api/registrations", params={"pageSize": 50})).json()["items"]
            rids = [
                i["id"]
                for i in items
                if i["lastName"] in ("Otieno", "Ochieng", "Muthoni", "Wekesa")
            ]
            assert len(rids) == 4
            clients = [StreamClient(url, headers=headers) for _ in range(6)]
            clients += [StreamClient(url, registration_id=rid, headers=headers) for rid in rids]
            readers = [await c.__aenter__() for c in clients]
            try:
                for rid in rids:
                    assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
                for reader in readers[:6]:
                    for rid in rids:
                        await reader.wait_final(rid)
                for reader, rid in zip(readers[6:], rids, strict=True):
                    final = await reader.wait_final(rid)
                    assert {u["registrationId"] for u in reader.updates()} == {rid}
                    assert [u["seq"] for u in reader.updates()] == list(range(1, final["seq"] + 1))
                for reader in readers[:6]:
                    for rid in rids:
                        seqs = [u["seq"] for u in reader.updates(rid)]
                        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 5
                await asyncio.sleep(0.2)
            finally:
                for client in clients:
                    await client.__aexit__(None, None, None)
    text = log.read_text()
    assert text.count("Application startup complete") == 2, text[-2000:]
