"""The Celery app, with every setting that decides whether a job is lost or run twice, and why.

The database is the truth; a message is a hint to go and render. Everything below keeps the hint from being lost
quietly or delivered to two workers at once.
"""

from __future__ import annotations

import os

from celery import Celery

from schemas.errors import ConfigError
from schemas.messages import HEARTBEATS_STREAM, REPORTS_STREAM

# A render must finish far inside the visibility timeout, or Redis hands its unacked message to a second worker
# while the first still renders (celery #5935, #3430). Real 4B renders take seconds; base models at 50 steps on
# a slow card, minutes.
HARD_TIME_LIMIT = 30 * 60
VISIBILITY_TIMEOUT = 6 * 60 * 60

# The Redis ACL rules of a worker's account (README, compose.yaml): its own queues and Celery's bookkeeping keys, the
# sheets of pushed models read-only (a stolen worker password must not point other workers at other files), and only
# the commands Celery's Redis transport sends (channels name database 0); and, in a selector of their own (Redis 7),
# XADD to the reports and heartbeats streams and nothing else there: a worker cannot read, trim or delete what other
# workers reported. No KEYS, FLUSH*, CONFIG, DEBUG, ACL, SHUTDOWN or other keys: a stolen worker password can take
# jobs and send reports, which the dispatcher checks against SQL and the bucket, and no more.
WORKER_ACL = ("resetchannels ~kiln.render.* %R~kiln.models.* ~_kombu.* ~unacked ~unacked_index ~unacked_mutex "
              "~*.celery.pidbox* &/0.celeryev/* &/0.celery.pidbox -@all +ping +brpop +rpop +lpush +llen +hset +hget "
              "+hdel +zadd +zrem +zrange +zrangebyscore +smembers +sadd +srem +exists +set +get +del +pexpire +time "
              "+evalsha +eval +script|load +script|exists +multi +exec +watch +unwatch +publish +subscribe "
              f"+psubscribe +unsubscribe +punsubscribe (~{REPORTS_STREAM} ~{HEARTBEATS_STREAM} +xadd)")


def make_app(broker_url: str, time_limit: float = HARD_TIME_LIMIT) -> Celery:
    """A Celery app on `broker_url` with Kiln's reliability settings; nothing is read from globals."""
    if time_limit * 2 > VISIBILITY_TIMEOUT:
        raise ConfigError(f"KILN_JOB_TIME_LIMIT_SECONDS: must stay under {VISIBILITY_TIMEOUT // 2} s, half the "
                          f"broker's visibility timeout, or a slow job would be handed to a second worker")
    app = Celery("kiln", broker=broker_url, set_as_current=False)
    app.conf.update(
        # JSON only: with pickle, anyone who can write to the broker runs code on every worker.
        task_serializer="json", accept_content=["json"], result_serializer="json",
        # No result backend: results travel as report messages that the dispatcher records in SQL.
        task_ignore_result=True, result_backend=None,
        # Ack after the task: a worker that dies mid-render leaves its message to come back...
        task_acks_late=True,
        # ...also when the process is killed (OOM killer, power off with the solo pool's parent alive)...
        task_reject_on_worker_lost=True,
        # ...but a job that kills its process every time must not loop forever: celery 5.7 caps those requeues.
        task_retry_on_worker_lost=True,  # capped by the render task's max_retries
        # One message in hand per worker: a GPU renders one job at a time, and prefetched messages would sit
        # unacked on a busy card while others idle.
        worker_prefetch_multiplier=1,
        # Past the limit the GPU process is killed and replaced; the job comes back through the reaper.
        task_time_limit=time_limit,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            # Consume queues in the order given: a worker's biggest-job queue first (needs kombu 5.7, kombu #801).
            "queue_order_strategy": "priority",
            # Give a dead worker's unacked messages back within seconds, not minutes.
            "unacked_restore_throttle": 1, "unacked_restore_interval": 5,
            # Notice a half-open connection (home routers drop idle NAT entries) and reconnect.
            "socket_keepalive": True, "health_check_interval": 10, "socket_timeout": 30,
        },
        # Home PCs lose their network for hours: never give up reconnecting (the default gives up after ~47 min).
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        # After a reconnect the broker may already have handed our unacked job to someone else: stop it here.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Every render message names its queue (schemas.capacity); reports travel in a Redis stream, not as tasks.
        task_create_missing_queues=True,
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,  # Kiln logs its own way
        worker_send_task_events=True, task_send_sent_event=False,
        broker_connection_timeout=10,
    )
    return app


def app_from_environment() -> Celery:
    """For Celery's own tools: `celery -A schemas.broker inspect active_queues` (needs KILN_BROKER_URL)."""
    url = os.environ.get("KILN_BROKER_URL")
    if not url:
        raise ConfigError("KILN_BROKER_URL is not set: point it at the fleet's Redis, e.g. redis://host:6379/0")
    return make_app(url)


def __getattr__(name: str) -> Celery:  # `celery -A schemas.broker` looks up `app` (or `celery`) here
    if name in ("app", "celery"):
        return app_from_environment()
    raise AttributeError(name)
