"""The Celery app's configuration for Conveyor: JSON only, late acknowledgement, priorities."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer

from ..errors import ConfigurationError
from ..settings import Settings

logger = logging.getLogger("conveyor.engine")

# Conveyor priorities (any integer, higher first) map onto 10 broker levels.
PRIORITY_LEVELS = 10


def broker_priority(priority: int, broker_url: str) -> int:
    """The broker's priority for a Conveyor priority: RabbitMQ runs higher numbers first,
    Redis (kombu's priority lists) lower ones."""
    level = min(max(priority, 0), PRIORITY_LEVELS - 1)
    return level if broker_url.startswith("amqp") else PRIORITY_LEVELS - 1 - level


def new_celery_app(settings: Settings) -> Celery:
    """A Celery app configured for Conveyor's messages (no task registered yet)."""
    if settings.engine != "celery":
        raise ConfigurationError("the Celery app needs CONVEYOR_ENGINE=celery")
    app = Celery("conveyor", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.celery_queue,
        task_queue_max_priority=PRIORITY_LEVELS - 1,
        task_default_priority=broker_priority(0, settings.broker_url or ""),
        broker_transport_options={
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer=f"{__name__}:BrokerLossConsumer",
    )
    return app


class BrokerLossConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, alive after its broker connection drops with messages unacknowledged.

    With Redis, Celery 5.7 and kombu 5.7 raise ``AttributeError`` (the lost connection's
    transport has no connection info left) in two places, and the worker then exits with
    "Unrecoverable error" (seen when Redis restarts mid-batch):

    * closing the lost connection's channel, which tries to give its unacknowledged messages
      back through that transport;
    * acknowledging, after the reconnection, a task that ran while the connection was lost.

    Both are taken as the connection errors they are: the consumer reconnects, and an
    acknowledgement that cannot be sent is logged and dropped. The messages concerned are lost
    with the connection; the store re-sends what they carried and drops what already ran.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # given to each request too (Celery's ``ack_log_error`` logs these and carries on)
        errors: tuple[type[BaseException], ...] = self.conninfo.connection_errors
        self.connection_errors = (*errors, AttributeError)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            logger.warning("closing the lost broker connection failed (%r); reconnecting", error)
