"""api/deps.py: each dependency alias hands a route the object the lifespan exposed under its
name, and no route takes the whole ``Services`` container."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.params import Depends
from fastapi.routing import APIRoute
from starlette.datastructures import State
from starlette.requests import Request

from regstream.api import deps
from regstream.app import create_api
from regstream.config import Settings
from tests.support import TEST_SECRET_KEY

ALIASES = {
    "SettingsDep": "settings",
    "EngineDep": "engine",
    "SessionsDep": "sessions",
    "RedisDep": "redis",
    "BusDep": "bus",
    "HubDep": "hub",
    "RunnerDep": "runner",
}


class _App:
    def __init__(self, state: State) -> None:
        self.state = state


def _request(state: State) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [], "app": _App(state)})


def _exposed() -> tuple[State, deps.Services]:
    """A Services of stand-ins (one distinct object per field; nothing here is called) exposed
    on a fresh state as the lifespan does."""
    parts: dict[str, Any] = {
        f.name: object() for f in dataclasses.fields(deps.Services) if f.default is dataclasses.MISSING
    }  # fmt: skip
    services = deps.Services(**parts)
    state = State()
    deps.expose(state, services)
    state.auth = object()  # the lifespan puts the auth runtime there itself (app.lifespan)
    return state, services


def _dependency(alias: Any) -> Any:
    marker = get_args(alias)[1]
    assert isinstance(marker, Depends)
    return marker.dependency


@pytest.mark.parametrize("alias, field", [pytest.param(a, f, id=a) for a, f in ALIASES.items()])
async def test_an_alias_gives_the_object_the_lifespan_exposed(alias: str, field: str) -> None:
    state, services = _exposed()
    got = await _dependency(getattr(deps, alias))(_request(state))
    assert got is getattr(services, field)


async def test_auth_dep_gives_the_auth_runtime() -> None:
    state, _ = _exposed()
    assert await _dependency(deps.AuthDep)(_request(state)) is state.auth


@pytest.mark.parametrize(
    "leaving, draining, phase",
    [
        pytest.param(False, False, "serving", id="serving"),
        pytest.param(True, False, "leaving", id="leaving"),
        pytest.param(True, True, "draining", id="draining"),
    ],
)
async def test_shutdown_phase_follows_the_drain_flags(
    leaving: bool, draining: bool, phase: str
) -> None:
    state, services = _exposed()
    services.leaving, services.draining = leaving, draining
    assert await deps.get_shutdown_phase(_request(state)) == phase


def _calls(dependant: Dependant) -> list[Any]:
    found = []
    for sub in dependant.dependencies:
        found.append(sub.call)
        found.extend(_calls(sub))
    return found


def _api_routes(routes: list[Any]) -> list[APIRoute]:
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included router (FastAPI >= 0.16x)
        if inner is not None:
            found.extend(_api_routes(inner.routes))
        elif isinstance(route, APIRoute):
            found.append(route)
    return found


async def test_no_route_takes_the_services_container(tmp_path: Path) -> None:
    """Routes name what they use (``RunnerDep``...): a reader follows a click from the route to
    the object, never through ``services.runner``. Every state getter a route depends on (an
    async ``(request)`` function) is called against an exposed state; none may return the
    container."""
    api = create_api(Settings(data_dir=tmp_path, secret_key=TEST_SECRET_KEY))
    routes = _api_routes(list(api.routes))
    assert len(routes) >= 25
    state, services = _exposed()
    getters = {
        call
        for route in routes
        for call in _calls(route.dependant)
        if inspect.iscoroutinefunction(call) and list(inspect.signature(call).parameters) == ["request"]
    }  # fmt: skip
    assert len(getters) >= 8
    takers = [g.__name__ for g in getters if await g(_request(state)) is services]
    assert takers == []
