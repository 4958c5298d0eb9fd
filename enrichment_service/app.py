"""The local enrichment service: deterministic answers, and faults on demand.

    POST /v1/enrich  {"items": [{"key": str, "kind": KIND, "value": str}, ...]}  (1..500 items)
        -> 200 {"results": [{"key": str, "found": bool, "fields": {...}}, ...]} in request order
        KIND country_code (ISO 3166 alpha-2) -> country_name, region
             email                           -> domain (lowercased), is_free_provider
             currency_code (ISO 4217)        -> currency_name
        Unknown value: found false, fields {}. Bad request: 400/422 application/problem+json.

    Test mode only (`create_app(test_mode=True)`, `upsertflow-enrichment --test-mode`: `make dev`
    and the tests); without it these are 404 and the headers are ignored:
    per-request faults: headers X-Fault-Latency-Ms, X-Fault-Status, X-Fault-Hang: 1;
    GET|PUT|DELETE /_faults  {"latency_ms", "error_rate", "error_status", "hang", "fail_next",
        "seed", "forget"}: faults of every enrich request (PUT replaces all; DELETE: none).
    GET|DELETE /_stats  {"requests", "items", "faults", "in_flight", "peak_in_flight",
        "by_status", "by_key"}

    GET /healthz  {"status": "ok"}

Every app keeps its own state on `app.state`, so several can run in one process.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_ITEMS = 500
PROBLEM_TYPE_PREFIX = "urn:upsertflow:enrichment:"

COUNTRIES: dict[str, tuple[str, str]] = {
    "AE": ("United Arab Emirates", "Asia"),
    "AR": ("Argentina", "Americas"),
    "AT": ("Austria", "Europe"),
    "AU": ("Australia", "Oceania"),
    "BE": ("Belgium", "Europe"),
    "BR": ("Brazil", "Americas"),
    "CA": ("Canada", "Americas"),
    "CH": ("Switzerland", "Europe"),
    "CL": ("Chile", "Americas"),
    "CN": ("China", "Asia"),
    "CO": ("Colombia", "Americas"),
    "CZ": ("Czechia", "Europe"),
    "DE": ("Germany", "Europe"),
    "DK": ("Denmark", "Europe"),
    "EG": ("Egypt", "Africa"),
    "ES": ("Spain", "Europe"),
    "FI": ("Finland", "Europe"),
    "FR": ("France", "Europe"),
    "GB": ("United Kingdom", "Europe"),
    "GR": ("Greece", "Europe"),
    "ID": ("Indonesia", "Asia"),
    "IE": ("Ireland", "Europe"),
    "IL": ("Israel", "Asia"),
    "IN": ("India", "Asia"),
    "IT": ("Italy", "Europe"),
    "JP": ("Japan", "Asia"),
    "KE": ("Kenya", "Africa"),
    "KR": ("South Korea", "Asia"),
    "LU": ("Luxembourg", "Europe"),
    "MA": ("Morocco", "Africa"),
    "MX": ("Mexico", "Americas"),
    "NG": ("Nigeria", "Africa"),
    "NL": ("Netherlands", "Europe"),
    "NO": ("Norway", "Europe"),
    "NZ": ("New Zealand", "Oceania"),
    "PL": ("Poland", "Europe"),
    "PT": ("Portugal", "Europe"),
    "SA": ("Saudi Arabia", "Asia"),
    "SE": ("Sweden", "Europe"),
    "SG": ("Singapore", "Asia"),
    "TR": ("Türkiye", "Asia"),
    "UA": ("Ukraine", "Europe"),
    "US": ("United States", "Americas"),
    "ZA": ("South Africa", "Africa"),
}

CURRENCIES: dict[str, str] = {
    "AUD": "Australian Dollar",
    "BRL": "Brazilian Real",
    "CAD": "Canadian Dollar",
    "CHF": "Swiss Franc",
    "CNY": "Yuan Renminbi",
    "CZK": "Czech Koruna",
    "DKK": "Danish Krone",
    "EUR": "Euro",
    "GBP": "Pound Sterling",
    "HKD": "Hong Kong Dollar",
    "INR": "Indian Rupee",
    "JPY": "Yen",
    "KRW": "Won",
    "MXN": "Mexican Peso",
    "NOK": "Norwegian Krone",
    "NZD": "New Zealand Dollar",
    "PLN": "Zloty",
    "SEK": "Swedish Krona",
    "SGD": "Singapore Dollar",
    "TRY": "Turkish Lira",
    "USD": "US Dollar",
    "ZAR": "Rand",
}

FREE_EMAIL_PROVIDERS = frozenset(
    {
        "aol.com",
        "gmail.com",
        "gmx.de",
        "gmx.net",
        "googlemail.com",
        "hotmail.com",
        "icloud.com",
        "live.com",
        "mail.ru",
        "outlook.com",
        "proton.me",
        "protonmail.com",
        "web.de",
        "yahoo.com",
        "yandex.ru",
    }
)

Kind = Literal["country_code", "email", "currency_code"]
Fields = dict[str, str | bool]
M = TypeVar("M", bound=BaseModel)


class FaultConfig(BaseModel):
    """The faults applied to every enrich request; the defaults are no faults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    latency_ms: int = Field(default=0, ge=0, le=3_600_000)
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    error_status: int = Field(default=503, ge=400, le=599)
    hang: bool = False
    fail_next: int = Field(default=0, ge=0)
    seed: int = 0
    #: Answer every value as unknown (found false): a dependency that lost its data.
    forget: bool = False


class EnrichItem(BaseModel):
    """One value to enrich; `key` is the caller's and is echoed back."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    kind: Kind
    value: str


class EnrichRequest(BaseModel):
    """The body of `POST /v1/enrich`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[EnrichItem] = Field(min_length=1, max_length=MAX_ITEMS)


@dataclass
class Stats:
    """What the enrich endpoint saw since the start or the last `DELETE /_stats`."""

    requests: int = 0
    items: int = 0
    faults: int = 0
    in_flight: int = 0
    #: The most enrich requests in flight at once.
    peak_in_flight: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_key: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        """Return the stats as the JSON body of `GET /_stats`."""
        return {
            "requests": self.requests,
            "items": self.items,
            "faults": self.faults,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "by_status": dict(self.by_status),
            "by_key": dict(self.by_key),
        }


@dataclass
class ServiceState:
    """Everything one app instance keeps between requests."""

    faults: FaultConfig
    rng: random.Random
    stats: Stats = field(default_factory=Stats)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether callers may inject faults (endpoints and headers) and read the counters.
    test_mode: bool = False

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the faults (by a copy), and restart the error-rate sequence from their seed."""
        self.faults = faults.model_copy()
        self.rng = random.Random(faults.seed)


def create_app(faults: FaultConfig | None = None, *, test_mode: bool = False) -> FastAPI:
    """Return a new enrichment service with its own faults and counters.

    `faults` apply from the start. Only with `test_mode` can callers change them (`/_faults`,
    `X-Fault-*` headers) or read the counters (`/_stats`).
    """
    app = FastAPI(title="upsertflow enrichment service", version="1")
    state = ServiceState(faults=FaultConfig(), rng=random.Random(), test_mode=test_mode)
    state.set_faults(faults or FaultConfig())
    app.state.enrichment = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        problem = _problem(exc.status_code, "http-error", str(exc.detail), str(exc.detail))
        problem.headers.update(exc.headers or {})
        return problem

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/enrich")
    async def enrich(request: Request) -> Response:
        state.stats.requests += 1
        state.stats.in_flight += 1
        state.stats.peak_in_flight = max(state.stats.peak_in_flight, state.stats.in_flight)
        try:
            response = await _enrich(request, state)
        finally:
            state.stats.in_flight -= 1
        state.stats.by_status[str(response.status_code)] += 1
        return response

    if test_mode:
        _add_test_routes(app, state)
    return app


def _add_test_routes(app: FastAPI, state: ServiceState) -> None:
    """The fault and counter endpoints of test mode."""

    @app.get("/_faults")
    async def get_faults() -> dict[str, Any]:
        return state.faults.model_dump()

    @app.put("/_faults")
    async def put_faults(request: Request) -> Response:
        parsed = _parse(await request.body(), FaultConfig)
        if isinstance(parsed, Response):
            return parsed
        state.set_faults(parsed)
        return JSONResponse(state.faults.model_dump())

    @app.delete("/_faults")
    async def delete_faults() -> dict[str, Any]:
        state.set_faults(FaultConfig())
        return state.faults.model_dump()

    @app.get("/_stats")
    async def get_stats() -> dict[str, Any]:
        return state.stats.as_json()

    @app.delete("/_stats")
    async def delete_stats() -> dict[str, Any]:
        in_flight = state.stats.in_flight
        state.stats = Stats(in_flight=in_flight, peak_in_flight=in_flight)
        return state.stats.as_json()


def service_state(app: FastAPI) -> ServiceState:
    """Return the state of an app made by `create_app` (for tests that look inside)."""
    return cast(ServiceState, app.state.enrichment)


def release_hangs(app: FastAPI) -> None:
    """End every hanging request (with a 503) and stop hanging: the server is shutting down."""
    service_state(app).release.set()


async def _enrich(request: Request, state: ServiceState) -> Response:
    """Apply the faults in order (latency, hang, status), then validate and answer."""
    body = await request.body()
    headers = _fault_headers(request) if state.test_mode else (None, False, None)
    if isinstance(headers, Response):
        return headers
    latency_ms, hang, status = headers

    latency_ms = state.faults.latency_ms if latency_ms is None else latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)

    faults = state.faults  # after the sleep: a PUT /_faults may have replaced them
    if hang or faults.hang:
        state.stats.faults += 1
        if await _hang(request, state.release):
            return _problem(503, "shutting-down", "Shutting down", "released a hanging request")
        # Nobody will read this: the client went away (nginx's "499 Client Closed Request").
        return Response(status_code=499)

    reason = None
    if status is not None:
        reason = "X-Fault-Status header"
    elif faults.fail_next > 0:
        faults.fail_next -= 1
        status, reason = faults.error_status, f"fail_next ({faults.fail_next} left)"
    elif faults.error_rate > 0 and state.rng.random() < faults.error_rate:
        status, reason = faults.error_status, f"error_rate {faults.error_rate}"
    if status is not None:
        state.stats.faults += 1
        return _problem(status, "injected-fault", "Injected fault", f"injected by {reason}")

    parsed = _parse(body, EnrichRequest)
    if isinstance(parsed, Response):
        return parsed
    results = []
    for item in parsed.items:
        fields = None if faults.forget else _lookup(item.kind, item.value)
        results.append({"key": item.key, "found": fields is not None, "fields": fields or {}})
        state.stats.by_key[item.value] += 1
    state.stats.items += len(parsed.items)
    # orjson: the bytes `JSONResponse` would send (compact, UTF-8), ~15x faster.
    return Response(orjson.dumps({"results": results}), media_type="application/json")


def _lookup(kind: Kind, value: str) -> Fields | None:
    """Return the fields known for a value, or None."""
    if kind == "country_code":
        country = COUNTRIES.get(value.strip().upper())
        return None if country is None else {"country_name": country[0], "region": country[1]}
    if kind == "currency_code":
        name = CURRENCIES.get(value.strip().upper())
        return None if name is None else {"currency_name": name}
    local, at, domain = value.strip().rpartition("@")
    domain = domain.lower()
    if (
        not local
        or not at
        or "." not in domain.strip(".")
        or any(c.isspace() for c in value.strip())
    ):
        return None
    return {"domain": domain, "is_free_provider": domain in FREE_EMAIL_PROVIDERS}


async def _hang(request: Request, release: asyncio.Event) -> bool:
    """Wait until the client disconnects (return False) or the app releases hanging requests."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    waiters = [asyncio.ensure_future(disconnected()), asyncio.ensure_future(release.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        return release.is_set()
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class _BadHeader(Exception):
    """An X-Fault-* header that cannot be used."""


def _fault_headers(request: Request) -> tuple[int | None, bool, int | None] | Response:
    """Return (latency_ms, hang, status) from the X-Fault-* headers, or a 400 problem."""
    try:
        latency_ms = _int_header(request, "X-Fault-Latency-Ms", 0, 3_600_000)
        status = _int_header(request, "X-Fault-Status", 400, 599)
        hang = request.headers.get("X-Fault-Hang", "0").strip().lower()
        if hang not in {"0", "1", "true", "false"}:
            raise _BadHeader(f"header X-Fault-Hang must be 1 or 0, not {hang!r}")
    except _BadHeader as exc:
        return _problem(400, "invalid-header", "Invalid fault header", str(exc))
    return latency_ms, hang in {"1", "true"}, status


def _int_header(request: Request, name: str, low: int, high: int) -> int | None:
    """Return an integer header from `low` to `high`, None if absent; raise `_BadHeader`."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _BadHeader(f"header {name} must be an integer from {low} to {high}, not {raw!r}")
    return value


def _parse(body: bytes, model: type[M]) -> M | Response:
    """Return the body as a `model`, or a problem: 400 if it is not JSON, 422 if it is wrong."""
    try:
        # pydantic's own JSON parser: ~4x faster than `json.loads` and validating after it.
        return model.model_validate_json(body)
    except ValidationError as exc:
        found = exc.errors(include_url=False)
        if found[0]["type"] == "json_invalid":
            reason = found[0]["msg"].removeprefix("Invalid JSON: ")
            return _problem(
                400, "malformed-json", "Malformed JSON", f"the body is not JSON: {reason}"
            )
        errors = [
            {"loc": _loc(error["loc"]), "message": _message(error), "type": error["type"]}
            for error in found[:20]
        ]
        detail = "; ".join(f"{e['loc']}: {e['message']}" for e in errors[:5])
        more = len(found) - 5
        detail += f"; and {more} more" if more > 0 else ""
        return _problem(422, "invalid-request", "Invalid request", detail, errors=errors)


def _loc(loc: tuple[int | str, ...]) -> str:
    """Return a pydantic error location as `items[0].kind`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


def _message(error: Any) -> str:
    """Return a pydantic error message, with the rejected value when it is a scalar."""
    message = str(error["msg"])
    value = error.get("input")
    if error["type"] != "missing" and not isinstance(value, dict | list):
        message += f" (got {json.dumps(value)[:80]})"
    return message


def _problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    """Return an RFC 9457 problem; 429 and 503 carry `Retry-After: 1`."""
    body = {"type": PROBLEM_TYPE_PREFIX + slug, "title": title, "status": status, "detail": detail}
    headers = {"Retry-After": "1"} if status in {429, 503} else None
    return JSONResponse(
        body | extra, status_code=status, headers=headers, media_type="application/problem+json"
    )
