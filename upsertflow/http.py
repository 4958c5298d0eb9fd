"""The worker's outgoing HTTP: an httpx transport that a cancelled caller cannot break.

httpcore (1.0.9, the latest) loses a pool slot for good when a request is cancelled at
the wrong moment — while it waits for a connection, or while its new connection is being
opened (encode/httpcore#1093, #830). The worker cancels requests all the time: an
activity whose heartbeat or start-to-close deadline passed, the other batches in flight
when one batch fails, a worker shutting down. Each such cancellation may leak a slot;
once `max_connections` have leaked, every request fails with a pool timeout while the
service is idle, and only a restart recovers (`bench/RESULTS.md`, the backlog of 10,000).

`CancelSafeTransport` keeps the pool out of harm's way: at most `max_connections`
requests are handed to the pool at once (so none ever waits in it), a caller waits for
its turn here instead (cancellable at no cost, bounded by the request's pool timeout),
and once handed over an exchange runs to its end — response read, connection back in
the pool — even if its caller has been cancelled meanwhile; it is bounded by the
request's own timeouts.
"""

from __future__ import annotations

import asyncio

import httpx


class CancelSafeTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncHTTPTransport` with `max_connections` (all kept alive), safe to cancel
    (see the module)."""

    def __init__(self, max_connections: int) -> None:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._pool = httpx.AsyncHTTPTransport(limits=limits)
        self._turns = asyncio.Semaphore(max_connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool_timeout = request.extensions.get("timeout", {}).get("pool")
        try:
            async with asyncio.timeout(pool_timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free in time", request=request) from None
        exchange = asyncio.ensure_future(self._exchange(request))
        exchange.add_done_callback(self._done)
        return await asyncio.shield(exchange)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        response = await self._pool.handle_async_request(request)
        try:
            # As sent (still compressed, if it was): the client decodes it.
            content = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=content,
            extensions={
                key: value for key, value in response.extensions.items() if key != "network_stream"
            },
            request=request,
        )

    def _done(self, exchange: asyncio.Future[httpx.Response]) -> None:
        self._turns.release()
        if not exchange.cancelled():
            exchange.exception()  # retrieved here too: its caller may be gone

    async def aclose(self) -> None:
        await self._pool.aclose()
