"""A Temenos Transact (IRIS REST) stand-in for tests, demos and operators.

Serves, under ``/api/v1.0.0``::

    GET /party/customers/{customerId}
    GET /party/customers/{customerId}/arrangements     paged
    GET /holdings/customers/{customerId}/holdings      paged, holdings v4 shape
    GET /holdings/?customerId=...                      same answer

and control endpoints under ``/_sim``: ``GET stats`` (``calls`` per endpoint,
``callsByCustomer``, ``inFlight``), ``GET|POST config`` (``latency_ms``,
``fault_rate``, ``cob``, ``holdings_v4``), ``POST reset`` and ``GET healthz``.

``holdings_v4`` makes ``/arrangements`` answer in the holdings v4 shape (a core whose accounts
enquiry is the holdings API): the client must read both.

Each T24 call goes through the same steps, in order: count it, wait ``latency_ms``, answer
503 + ``Retry-After: 1`` if ``cob`` is on, check Basic auth if ``require_auth`` is set,
fail with 500 ``TGVCP-001`` for a ``fault_rate`` fraction of calls (seeded RNG), apply the
CIF's scripted fault (``dataset.SCRIPTS``), then answer from ``dataset.CUSTOMERS`` (or a
generated load customer, ``dataset.load_customer``).

Decisions:

- Paging: ``page_start`` is a 1-based page number; the first page issues a ``page_token``
  that later pages must send back (400 ``TGVCP-007`` without it, ``TGVCP-003`` for an
  unknown one), which proves the client follows tokens. A repeated paging parameter is 400
  ``TGVCP-017``. Tokens and per-CIF counters are bounded.
- Every sleep is bounded (``MAX_SLEEP``) and ends early when the client disconnects, so a
  client that timed out frees the handler at once and uvicorn can shut down promptly.
- State lives on one event loop and no handler awaits between reading and updating it, so
  there are no locks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive

from regstream.core_banking.simulator import _responses as r
from regstream.core_banking.simulator.dataset import CUSTOMERS, SCRIPTS, Fault, load_customer

__all__ = ["API_PREFIX", "MAX_SLEEP", "SimulatorConfig", "create_simulator_app"]

API_PREFIX = "/api/v1.0.0"
#: Longest any simulated sleep lasts (seconds).
MAX_SLEEP = 30.0
SLOW_SECONDS = 1.5
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 1000
_MAX_TOKENS = 1024
_MAX_TRACKED_CUSTOMERS = 10_000
_ENDPOINTS = ("customer", "arrangements", "holdings")


@dataclass
class SimulatorConfig:
    """Knobs of the simulator; ``latency_ms``, ``fault_rate`` and ``cob`` change at run time."""

    latency_ms: float = 50.0
    fault_rate: float = 0.0
    cob: bool = False
    seed: int = 24
    require_auth: tuple[str, str] | None = None
    holdings_v4: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.latency_ms, bool) or not 0 <= self.latency_ms <= MAX_SLEEP * 1000:
            raise ValueError(f"latency_ms must be between 0 and {MAX_SLEEP * 1000:.0f}")
        if isinstance(self.fault_rate, bool) or not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        if not isinstance(self.cob, bool):
            raise ValueError("cob must be true or false")
        if not isinstance(self.holdings_v4, bool):
            raise ValueError("holdings_v4 must be true or false")


class _State:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.in_flight = 0  # T24 requests being handled right now (not reset)
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.calls: Counter[str] = Counter({endpoint: 0 for endpoint in _ENDPOINTS})
        self.by_customer: Counter[str] = Counter()
        self.tokens: OrderedDict[str, str] = OrderedDict()

    def count(self, endpoint: str, cif: str) -> int:
        """Count a call; return how many calls this CIF has had (this one included)."""
        self.calls[endpoint] += 1
        if cif in self.by_customer or len(self.by_customer) < _MAX_TRACKED_CUSTOMERS:
            self.by_customer[cif] += 1
        return self.by_customer[cif]

    def new_token(self, cif: str) -> str:
        token = f"{self.rng.getrandbits(48):012x}"
        self.tokens[token] = cif
        while len(self.tokens) > _MAX_TOKENS:
            self.tokens.popitem(last=False)
        return token


def create_simulator_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app (serve it with uvicorn, or see ``server.serve_in_thread``)."""
    state = _State(config or SimulatorConfig())
    api = [
        Route("/party/customers/{customerId}", _customer, methods=["GET"]),
        Route("/party/customers/{customerId}/arrangements", _arrangements, methods=["GET"]),
        Route("/holdings/customers/{customerId}/holdings", _holdings, methods=["GET"]),
        Route("/holdings/", _holdings, methods=["GET"]),
    ]
    control = [
        Route("/stats", _stats, methods=["GET"]),
        Route("/config", _config, methods=["GET", "POST"]),
        Route("/reset", _reset, methods=["POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
    ]
    app = Starlette(routes=[Mount(API_PREFIX, routes=api), Mount("/_sim", routes=control)])
    app.state.sim = state
    return app


# --- T24 endpoints ------------------------------------------------------------------------------


async def _customer(request: Request) -> Response:
    return await _serve(request, "customer")


async def _arrangements(request: Request) -> Response:
    return await _serve(request, "arrangements")


async def _holdings(request: Request) -> Response:
    return await _serve(request, "holdings")


async def _serve(request: Request, endpoint: str) -> Response:
    started = time.perf_counter()
    state: _State = request.app.state.sim
    cif = request.path_params.get("customerId") or request.query_params.get("customerId", "")
    call_number = state.count(endpoint, cif)
    state.in_flight += 1
    try:
        response = await _before_data(request, state, endpoint, cif, call_number, started)
        if response is None:
            response = _answer(request, state, endpoint, cif, started)
    finally:
        state.in_flight -= 1
    if correlation_id := request.headers.get("X-Correlation-ID"):
        response.headers["X-Correlation-ID"] = correlation_id[:64]
    return response


async def _before_data(
    request: Request, state: _State, endpoint: str, cif: str, call_number: int, started: float
) -> Response | None:
    """Latency, COB, auth, random faults and scripted faults; ``None`` = answer with data."""
    config = state.config
    if not await _pause(request, config.latency_ms / 1000):
        return r.gone()
    if config.cob:
        return r.error(503, "TGVCP-001", r.COB_IN_PROGRESS, started, retry_after=1)
    if config.require_auth is not None and not _authorized(request, config.require_auth):
        return r.error(401, "TGVCP-011", "SECURITY VIOLATION - INVALID SIGN ON", started)
    if config.fault_rate and state.rng.random() < config.fault_rate:
        return r.error(500, "TGVCP-001", r.NO_RESPONSE, started)
    if not cif:
        return r.error(400, "TGVCP-007", "Mandatory input customerId missing", started)
    script = SCRIPTS.get(cif)
    if script is None or endpoint not in script.endpoints:
        return None
    return await _scripted(request, script.fault, call_number, started)


async def _scripted(
    request: Request, fault: Fault, call_number: int, started: float
) -> Response | None:
    match fault:
        case Fault.SLOW:
            return None if await _pause(request, SLOW_SECONDS) else r.gone()
        case Fault.TIMEOUT:
            return r.gateway_error(504) if await _pause(request, MAX_SLEEP) else r.gone()
        case Fault.SYSTEM_ERROR:
            return r.error(500, "TGVCP-001", r.NO_RESPONSE, started)
        case Fault.BAD_GATEWAY:
            return r.gateway_error(502)
        case Fault.GATEWAY_TIMEOUT:
            return r.gateway_error(504)
        case Fault.MAINTENANCE:
            return r.error(503, "TGVCP-001", r.COB_IN_PROGRESS, started, retry_after=1)
        case Fault.COB_SYSTEM_ERROR:
            return r.error(500, "TGVCP-001", r.COB_IN_PROGRESS, started)
        case Fault.UNAUTHORIZED:
            return r.error(401, "TGVCP-011", "SECURITY VIOLATION - INVALID SIGN ON", started)
        case Fault.FORBIDDEN:
            return r.error(403, "TGVCP-002", "SECURITY VIOLATION", started)
        case Fault.BAD_REQUEST:
            return r.error(400, "TGVCP-003", "Invalid query parameter", started)
        case Fault.GARBAGE:
            return r.garbage()
        case Fault.NO_BODY:
            return JSONResponse({"header": {"status": "success", "audit": r.audit(started)}})
        case Fault.NO_RECORDS:
            return r.error(404, "TGVCP-002", r.NO_RECORDS, started)
        case Fault.FLAKY:
            if call_number % 3 == 0:
                return None
            return r.error(500, "TGVCP-001", r.NO_RESPONSE, started)
        case Fault.BRIEF_MAINTENANCE:
            if call_number % 2 == 0:
                return None
            return r.error(503, "TGVCP-001", r.COB_IN_PROGRESS, started, retry_after=1)
    raise AssertionError(f"unhandled fault {fault}")  # pragma: no cover


def _answer(request: Request, state: _State, endpoint: str, cif: str, started: float) -> Response:
    customer = CUSTOMERS.get(cif) or load_customer(cif)
    if customer is None:
        return r.error(404, "TGVCP-002", r.RECORD_MISSING, started)
    if endpoint == "customer":
        return r.record(customer.to_wire(), started)
    products = [account.to_wire(cif) for account in customer.accounts]
    if endpoint == "arrangements" and not state.config.holdings_v4:
        return _page(request, state, cif, products, started)
    holdings: list[object] = []
    if products:
        total = round(sum(account.working_balance for account in customer.accounts), 2)
        holdings.append(
            {"productLineId": "ACCOUNTS", "totalAccountBalances": total, "products": products}
        )
    return _page(request, state, cif, holdings, started)


def _page(
    request: Request, state: _State, cif: str, rows: Sequence[object], started: float
) -> Response:
    params = request.query_params
    for name in ("page_size", "page_start", "page_token"):
        if len(params.getlist(name)) > 1:
            return r.error(400, "TGVCP-017", f"Duplicate query parameter {name}", started)
    try:
        size = int(params.get("page_size", DEFAULT_PAGE_SIZE))
        start = int(params.get("page_start", 1))
    except ValueError:
        size = start = 0
    if not (1 <= size <= MAX_PAGE_SIZE and start >= 1):
        return r.error(400, "TGVCP-003", "Invalid paging parameter", started)
    token = params.get("page_token")
    if token is not None:
        if state.tokens.get(token) != cif:
            return r.error(400, "TGVCP-003", "Invalid page_token", started)
    elif start > 1:
        return r.error(400, "TGVCP-007", "page_token is mandatory after the first page", started)
    else:
        token = state.new_token(cif)
    chunk = rows[(start - 1) * size : start * size]
    return r.success(
        chunk, started, page_size=size, page_start=start, total_size=len(rows), page_token=token
    )


# --- helpers ------------------------------------------------------------------------------------


#: pauses longer than this watch for the client's disconnect (the slow and timeout faults)
_WATCH_AFTER = 1.0


async def _pause(request: Request, seconds: float) -> bool:
    """Sleep up to ``seconds`` (bounded by ``MAX_SLEEP``); ``False`` if the client left first.

    A short pause (the per-call latency) is a plain sleep: watching for the disconnect costs a
    task and a wait per call, which doubled the simulator's CPU per call (374 against 169 us at
    50 ms; it shares the benches' load core), and a client that left frees nothing worth it."""
    if seconds <= 0:
        return True
    if seconds <= _WATCH_AFTER:
        await asyncio.sleep(seconds)
        return True
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({watcher}, timeout=min(seconds, MAX_SLEEP))
    finally:
        watcher.cancel()
    return not done


async def _wait_for_disconnect(receive: Receive) -> None:
    # A GET has one (empty) http.request message; the next receive() blocks until the client
    # disconnects (uvicorn) or the response is complete.
    while (await receive())["type"] != "http.disconnect":
        pass


def _authorized(request: Request, expected: tuple[str, str]) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(value, validate=True).partition(b":")
    except binascii.Error:
        return False
    # Compare both parts even when the first differs (no timing hint on which one is wrong).
    user_ok = secrets.compare_digest(user, expected[0].encode())
    password_ok = secrets.compare_digest(password, expected[1].encode())
    return user_ok and password_ok


# --- control endpoints --------------------------------------------------------------------------


async def _stats(request: Request) -> Response:
    state: _State = request.app.state.sim
    return JSONResponse(
        {
            "calls": dict(state.calls),
            "callsByCustomer": dict(state.by_customer),
            "inFlight": state.in_flight,
        }
    )


async def _config(request: Request) -> Response:
    state: _State = request.app.state.sim
    if request.method == "POST":
        try:
            changes = await request.json()
        except ValueError:
            return JSONResponse({"detail": "body must be JSON"}, status_code=400)
        allowed = {"latency_ms", "fault_rate", "cob", "holdings_v4"}
        if not isinstance(changes, dict) or not set(changes) <= allowed:
            return JSONResponse(
                {"detail": f"body must be an object with any of {sorted(allowed)}"},
                status_code=400,
            )
        try:
            state.config = replace(state.config, **changes)
        except (TypeError, ValueError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
    config = asdict(state.config)
    config.pop("require_auth")  # never echo credentials
    return JSONResponse(config)


async def _reset(request: Request) -> Response:
    state: _State = request.app.state.sim
    state.reset()
    return JSONResponse({"status": "ok"})


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})
