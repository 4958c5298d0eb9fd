"""`NotifyWorkflow`: deliver one `EtlEnded` event to the webhook receiver, with retries.

Started by `UpsertWorkflow` once its ETL's outcome is recorded, as a child it abandons
(`ParentClosePolicy.ABANDON`): the upsert completes at once, and the delivery retries on
its own — visible in the Web UI as `webhook:<upsert workflow id>` — for as long as its
policy says (`workflows.pipeline.WEBHOOK`), however long the receiver is down.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.webhooks import WebhookActivities
    from upsertflow.contracts import EtlEnded
    from workflows.pipeline import WEBHOOK


@workflow.defn
class NotifyWorkflow:
    @workflow.run
    async def run(self, event: EtlEnded) -> int:
        """Deliver `event`; return the receiver's status."""
        return await WEBHOOK.execute(
            WebhookActivities.deliver,
            event,
            summary=f"webhook {event.status.value} {event.resource_id} v{event.version}",
        )
