"""The `deliver_webhook` activity: tell the configured receiver that an ETL has ended.

The body is an `EtlEnded` event (ids, status, times: no resource data) as JSON. The
receiver can check it came from upsertflow with the `Upsertflow-Signature` header, as
Stripe-style webhooks do: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with
UPSERTFLOW_WEBHOOKS__SECRET>`; it rejects old timestamps to stop replays, and
deduplicates on `Upsertflow-Event-Id` (the event's `id`): a delivery is at least once.

A 2xx answer delivers it. A 5xx, 408/409/425/429, a timeout or a refused connection
is retried (the policy is `workflows.pipeline.WEBHOOK`); any other 4xx says the
receiver refuses this event, and retrying it would not change that: not retried.
Failures name the status only, never the receiver's answer.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.enrich import refused_for_good
from upsertflow.contracts import EtlEnded
from upsertflow.settings import Webhooks

SIGNATURE_HEADER = "Upsertflow-Signature"
EVENT_ID_HEADER = "Upsertflow-Event-Id"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Upsertflow-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class WebhookActivities:
    """Delivery of completion notifications over the worker's HTTP client."""

    def __init__(self, http: httpx.AsyncClient, config: Webhooks) -> None:
        self._http = http
        self._config = config

    @activity.defn(name="deliver_webhook")
    async def deliver(self, event: EtlEnded) -> int:
        """POST the event to the receiver; return its status once it accepted it (2xx)."""
        if not self._config.url:
            raise ApplicationError(
                "no webhook receiver is configured (UPSERTFLOW_WEBHOOKS__URL) on this worker",
                type="WebhookNotConfigured",
            )
        body = event.model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(
                self._config.secret.get_secret_value(), int(time.time()), body
            ),
            EVENT_ID_HEADER: event.id,
        }
        try:
            answer = await self._http.post(
                self._config.url,
                content=body,
                headers=headers,
                timeout=self._config.timeout_seconds,
                follow_redirects=False,
            )
        except httpx.HTTPError as error:
            raise ApplicationError(
                f"the webhook receiver could not be reached ({type(error).__name__}); retried",
                type="WebhookUnreachable",
            ) from None
        status = answer.status_code
        if 200 <= status < 300:
            return status
        if refused_for_good(status):
            raise ApplicationError(
                f"the webhook receiver refused the event with {status}; not retried",
                type="WebhookRejected",
                non_retryable=True,
            )
        raise ApplicationError(
            f"the webhook receiver answered {status}; retried", type="WebhookFailed"
        )
