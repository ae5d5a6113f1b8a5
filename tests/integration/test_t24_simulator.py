"""The T24 simulator over real HTTP: envelopes, paging, control endpoints, OpenAPI conformance.

Holdings answers are validated against the published holdings v4 OpenAPI document
(``shared/t24-spec/holdings-v4.openapi.json``) with every object schema closed
(``additionalProperties: false``), so a field the spec does not know fails the test too.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from regstream.core_banking.simulator import (
    DEMO_APPLICANTS,
    RunningSimulator,
    SimulatorConfig,
    create_simulator_app,
    serve_in_thread,
)
from regstream.core_banking.simulator.dataset import CUSTOMERS, SCRIPTS

# A copy of shared/t24-spec/holdings-v4.openapi.json (Temenos' published holdings v4 document).
SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "holdings-v4.openapi.json"
HOLDINGS = "/holdings/customers/{customerId}/holdings"


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[RunningSimulator]:
    with serve_in_thread(SimulatorConfig(latency_ms=0)) as sim:
        yield sim


@pytest.fixture
def http(simulator: RunningSimulator) -> Iterator[httpx.Client]:
    """A client on the simulator root, with default knobs and zeroed counters."""
    with httpx.Client(base_url=simulator.root_url, timeout=5) as client:
        client.post(
            "/_sim/config",
            json={"latency_ms": 0, "fault_rate": 0, "cob": False, "holdings_v4": False},
        )
        client.post("/_sim/reset").raise_for_status()
        yield client


def _api(cif: str, suffix: str = "") -> str:
    return f"/api/v1.0.0/party/customers/{cif}{suffix}"


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` where every object with ``properties`` forbids unknown keys."""
    if isinstance(schema, dict):
        out = {key: _closed(value) for key, value in schema.items()}
        if "properties" in out and out.get("type", "object") == "object":
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def holdings_validators() -> dict[str, jsonschema.Draft7Validator]:
    """Validators per response status of GET /holdings/customers/{customerId}/holdings."""
    if not SPEC_PATH.exists():  # pragma: no cover - the spec ships in shared/
        pytest.fail(f"holdings OpenAPI document not found at {SPEC_PATH}")
    spec = json.loads(SPEC_PATH.read_text())
    components = _closed(copy.deepcopy(spec["components"]))
    responses = spec["paths"][HOLDINGS]["get"]["responses"]
    validators = {}
    for status, response in responses.items():
        ref = response["content"]["application/json"]["schema"]["$ref"]
        schema = {"$ref": ref, "components": components}
        validators[status] = jsonschema.Draft7Validator(
            schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
        )
    return validators


def _validate_holdings(
    validators: dict[str, jsonschema.Draft7Validator], response: httpx.Response
) -> dict[str, Any]:
    document: dict[str, Any] = response.json()
    validator = validators.get(str(response.status_code), validators["default"])
    validator.validate(document)
    return document


# --- T24 envelopes --------------------------------------------------------------------------------


def test_customer_envelope(http: httpx.Client) -> None:
    response = http.get(_api("100100"), headers={"X-Correlation-ID": "abc123"})
    assert response.status_code == 200
    assert response.headers["X-Correlation-ID"] == "abc123"
    document = response.json()
    assert set(document) == {"header", "body"}
    assert document["header"]["status"] == "success"
    assert set(document["header"]["audit"]) == {
        "T24_time",
        "requestParse_time",
        "responseParse_time",
        "versionNumber",
    }
    body = document["body"]
    assert body["customerId"] == "100100"
    assert body["customerNames"] == [{"customerName": "OTIENO Amani"}]
    assert body["dateOfBirth"] == "1988-04-02"
    assert body["customerStatus"] == "1"
    assert body["legalDetails"][0]["legalDocumentName"] == "NATIONAL.ID"


def test_record_missing_error_body(http: httpx.Client) -> None:
    response = http.get(_api("100999"))
    assert response.status_code == 404
    document = response.json()
    assert document["header"]["status"] == "failed"
    assert "T24_time" in document["header"]["audit"]
    assert document["error"] == {
        "type": "BUSINESS",
        "code": "TGVCP-002",
        "message": "RECORD MISSING",
    }


@pytest.mark.parametrize(
    ("cif", "status", "code", "type_"),
    [
        pytest.param("100800", 500, "TGVCP-001", "SYSTEM", id="system-error"),
        pytest.param("100840", 500, "TGVCP-001", "SYSTEM", id="cob-system-error"),
        pytest.param("100830", 503, "TGVCP-001", "SYSTEM", id="maintenance"),
        pytest.param("100900", 401, "TGVCP-011", "BUSINESS", id="unauthorized"),
        pytest.param("100910", 403, "TGVCP-002", "BUSINESS", id="forbidden"),
        pytest.param("100920", 400, "TGVCP-003", "BUSINESS", id="bad-request"),
    ],
)
def test_scripted_t24_errors(
    http: httpx.Client, cif: str, status: int, code: str, type_: str
) -> None:
    response = http.get(_api(cif))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["type"] == type_


def test_maintenance_sends_retry_after(http: httpx.Client) -> None:
    assert http.get(_api("100830")).headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("cif", "status"),
    [pytest.param("100810", 502, id="502"), pytest.param("100820", 504, id="504")],
)
def test_gateway_errors_are_html(http: httpx.Client, cif: str, status: int) -> None:
    response = http.get(_api(cif))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")


def test_garbage_and_missing_body(http: httpx.Client) -> None:
    garbage = http.get(_api("100930"))
    assert garbage.status_code == 200
    with pytest.raises(ValueError):
        garbage.json()
    drift = http.get(_api("100940"))
    assert drift.status_code == 200
    assert "body" not in drift.json()


def test_no_records_only_on_lists(http: httpx.Client) -> None:
    assert http.get(_api("100510")).status_code == 200
    response = http.get(_api("100510", "/arrangements"))
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("No records were found")


def test_flaky_cycle(http: httpx.Client) -> None:
    assert [http.get(_api("100950")).status_code for _ in range(6)] == [500, 500, 200] * 2


# --- paging ---------------------------------------------------------------------------------------


def test_arrangements_paging(http: httpx.Client) -> None:
    first = http.get(_api("100200", "/arrangements"), params={"page_size": 25})
    header = first.json()["header"]
    assert (header["page_size"], header["page_start"], header["total_size"]) == (25, 1, 60)
    token = header["page_token"]
    assert len(first.json()["body"]) == 25
    rows = list(first.json()["body"])
    for page in (2, 3):
        response = http.get(
            _api("100200", "/arrangements"),
            params={"page_size": 25, "page_start": page, "page_token": token},
        )
        assert response.json()["header"]["page_start"] == page
        assert response.json()["header"]["page_token"] == token
        rows.extend(response.json()["body"])
    assert len(rows) == 60
    assert len({row["accountId"] for row in rows}) == 60
    assert rows[0]["arrangementStatus"] == "AUTH"
    assert sum(row["dormancyStatus"] == "DORMANT" for row in rows) == 5


@pytest.mark.parametrize(
    ("params", "code"),
    [
        pytest.param({"page_start": 2}, "TGVCP-007", id="later-page-without-token"),
        pytest.param({"page_start": 2, "page_token": "nope"}, "TGVCP-003", id="unknown-token"),
        pytest.param({"page_size": 0}, "TGVCP-003", id="page-size-zero"),
        pytest.param({"page_size": "ten"}, "TGVCP-003", id="page-size-text"),
        pytest.param([("page_size", "5"), ("page_size", "6")], "TGVCP-017", id="duplicate"),
    ],
)
def test_arrangements_paging_errors(http: httpx.Client, params: Any, code: str) -> None:
    response = http.get(_api("100200", "/arrangements"), params=params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_page_token_is_bound_to_the_customer(http: httpx.Client) -> None:
    token = http.get(_api("100200", "/arrangements")).json()["header"]["page_token"]
    response = http.get(
        _api("100100", "/arrangements"), params={"page_start": 2, "page_token": token}
    )
    assert response.status_code == 400


# --- holdings v4 against the published OpenAPI document -------------------------------------------


@pytest.mark.parametrize(
    ("cif", "params", "status"),
    [
        pytest.param("100100", {}, 200, id="approved"),
        pytest.param("100200", {"page_size": 1}, 200, id="paged"),
        pytest.param("100520", {}, 200, id="empty"),
        pytest.param("100999", {}, 404, id="record-missing"),
        pytest.param("100510", {}, 404, id="no-records"),
        pytest.param("100920", {}, 400, id="business-error"),
        pytest.param("100800", {}, 500, id="system-error"),
        pytest.param("100830", {}, 503, id="maintenance"),
        pytest.param("100200", {"page_start": 3}, 400, id="paging-error"),
    ],
)
def test_holdings_validate_against_openapi(
    http: httpx.Client,
    holdings_validators: dict[str, jsonschema.Draft7Validator],
    cif: str,
    params: dict[str, Any],
    status: int,
) -> None:
    response = http.get(f"/api/v1.0.0/holdings/customers/{cif}/holdings", params=params)
    assert response.status_code == status
    _validate_holdings(holdings_validators, response)


def test_holdings_shape(
    http: httpx.Client, holdings_validators: dict[str, jsonschema.Draft7Validator]
) -> None:
    response = http.get("/api/v1.0.0/holdings/customers/100100/holdings")
    document = _validate_holdings(holdings_validators, response)
    (holding,) = document["body"]
    assert holding["productLineId"] == "ACCOUNTS"
    assert [p["accountId"] for p in holding["products"]] == ["1010000", "1010001", "1010002"]
    assert holding["totalAccountBalances"] == pytest.approx(
        sum(p["workingBalance"] for p in holding["products"])
    )
    assert document["header"]["total_size"] == 1
    by_query = http.get("/api/v1.0.0/holdings/", params={"customerId": "100100"})
    assert by_query.json()["body"] == document["body"]


def test_holdings_v4_switch_answers_arrangements_in_the_v4_shape(
    http: httpx.Client, holdings_validators: dict[str, jsonschema.Draft7Validator]
) -> None:
    """A core whose accounts enquiry is the holdings API: ``/arrangements`` answers what
    ``/holdings`` does, valid against the published document (paging included)."""
    assert http.post("/_sim/config", json={"holdings_v4": True}).json()["holdings_v4"] is True
    response = http.get(_api("100200", "/arrangements"), params={"page_size": 1})
    document = _validate_holdings(holdings_validators, response)
    (holding,) = document["body"]
    assert len(holding["products"]) == 60
    assert (document["header"]["total_size"], document["header"]["page_size"]) == (1, 1)
    holdings = http.get("/api/v1.0.0/holdings/customers/100200/holdings").json()
    assert holdings["body"] == document["body"]


def test_the_closed_schema_catches_unknown_fields(
    holdings_validators: dict[str, jsonschema.Draft7Validator],
) -> None:
    document = {"header": {"status": "success"}, "body": [{"products": [{"iban": "x"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        holdings_validators["200"].validate(document)


# --- knobs and control endpoints ------------------------------------------------------------------


def test_stats_and_reset(http: httpx.Client) -> None:
    http.get(_api("100100"))
    http.get(_api("100100", "/arrangements"))
    http.get("/api/v1.0.0/holdings/customers/100120/holdings")
    stats = http.get("/_sim/stats").json()
    assert stats == {
        "calls": {"customer": 1, "arrangements": 1, "holdings": 1},
        "callsByCustomer": {"100100": 2, "100120": 1},
        "inFlight": 0,
    }
    http.post("/_sim/reset")
    assert http.get("/_sim/stats").json()["callsByCustomer"] == {}
    assert http.get("/_sim/healthz").json() == {"status": "ok"}


def test_config_changes_at_run_time(http: httpx.Client) -> None:
    changed = http.post("/_sim/config", json={"latency_ms": 200, "cob": True})
    assert changed.json() == {
        "latency_ms": 200, "fault_rate": 0, "cob": True, "seed": 24, "holdings_v4": False,
    }  # fmt: skip
    started = time.monotonic()
    response = http.get(_api("100100"))
    assert time.monotonic() - started >= 0.2
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    http.post("/_sim/config", json={"latency_ms": 0, "cob": False})
    assert http.get(_api("100100")).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"fault_rate": 1.5}, id="fault-rate-range"),
        pytest.param({"latency_ms": -1}, id="negative-latency"),
        pytest.param({"latency_ms": "fast"}, id="latency-text"),
        pytest.param({"cob": "yes"}, id="cob-text"),
        pytest.param({"holdings_v4": 1}, id="holdings-v4-number"),
        pytest.param({"seed": 1}, id="unknown-knob"),
        pytest.param([1], id="not-an-object"),
    ],
)
def test_config_rejects_bad_knobs(http: httpx.Client, body: Any) -> None:
    assert http.post("/_sim/config", json=body).status_code == 400
    assert http.get("/_sim/config").json()["fault_rate"] == 0


def test_fault_rate_is_seeded(http: httpx.Client) -> None:
    http.post("/_sim/config", json={"fault_rate": 0.5})

    def run() -> list[int]:
        http.post("/_sim/reset")
        return [http.get(_api("100100")).status_code for _ in range(20)]

    first = run()
    assert first == run()
    assert set(first) == {200, 500}


def test_disconnect_ends_a_simulated_timeout(http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        http.get(_api("100700"), timeout=0.2)
    deadline = time.monotonic() + 2
    while http.get("/_sim/stats").json()["inFlight"] != 0:
        assert time.monotonic() < deadline, "handler kept sleeping after the client left"
        time.sleep(0.02)


def test_require_auth() -> None:
    config = SimulatorConfig(latency_ms=0, require_auth=("user", "pw"))
    with serve_in_thread(config) as sim, httpx.Client(base_url=sim.base_url) as client:
        missing = client.get("/party/customers/100100")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == 'Basic realm="T24"'
        assert client.get("/party/customers/100100", auth=("user", "nope")).status_code == 401
        assert client.get("/party/customers/100100", auth=("user", "pw")).status_code == 200
        config_answer = httpx.get(sim.control_url + "/config").json()
        assert "require_auth" not in config_answer


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"fault_rate": 2.0}, id="fault-rate"),
        pytest.param({"latency_ms": -5.0}, id="latency"),
    ],
)
def test_simulator_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        create_simulator_app(SimulatorConfig(**kwargs))


# --- the dataset ----------------------------------------------------------------------------------


def test_demo_applicants_cover_every_scenario_with_unique_canaries() -> None:
    assert [d.scenario for d in DEMO_APPLICANTS] == [
        "approved",
        "approved_many_accounts",
        "kyc_mismatch",
        "not_found",
        "restricted",
        "no_active_accounts",
        "core_timeout",
        "core_error",
        "completed_update",
        "duplicate",
    ]
    for field in ("customer_number", "phone", "national_id", "email", "device_id"):
        values = [getattr(d, field) for d in DEMO_APPLICANTS]
        assert len(set(values)) == len(values), field
    for demo in DEMO_APPLICANTS:
        assert demo.phone.startswith("+2547000000")
        assert len(demo.national_id) == 8
        assert demo.enrolled is (demo.scenario in {"completed_update", "duplicate"})
    update = next(d for d in DEMO_APPLICANTS if d.scenario == "completed_update")
    assert update.enrolled_email not in (None, update.email)
    assert update.enrolled_device_id not in (None, update.device_id)
    duplicate = next(d for d in DEMO_APPLICANTS if d.scenario == "duplicate")
    assert (duplicate.enrolled_email, duplicate.enrolled_device_id) == (None, None)


def test_dataset_is_deterministic_and_consistent() -> None:
    assert CUSTOMERS["100100"].accounts[0].arrangement_id == "AA17098E4SK9"
    assert len(CUSTOMERS["100200"].accounts) == 60
    assert not set(SCRIPTS) & {"100100", "100200", "100300", "100400", "100500"}
    for demo in DEMO_APPLICANTS:
        if demo.scenario != "not_found":
            assert demo.customer_number in CUSTOMERS or demo.customer_number in SCRIPTS
