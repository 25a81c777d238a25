"""Webhook delivery: each event of the outbox (store.add_event) is POSTed as JSON to KILN_WEBHOOK_URL, signed
with HMAC-SHA256 over the exact body, until the receiver answers 2xx; failures back off up to an hour, and an
event is given up after a day of tries.

    POST KILN_WEBHOOK_URL
    Content-Type: application/json
    X-Kiln-Event: job.dead | batch.finished
    X-Kiln-Delivery: <event id>            the same on every retry of one event: deduplicate on it
    X-Kiln-Signature: sha256=<hex>         HMAC-SHA256 of the body with KILN_WEBHOOK_SECRET

    {"id": 7, "kind": "batch.finished", "created_at": "2026-11-27T21:50:00Z", "data": {...}}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from schemas.tables import Event

RETRY_BASE = timedelta(seconds=5)
RETRY_CAP = timedelta(hours=1)
GIVE_UP_AFTER = 30  # tries: 5 s doubling to an hour, then hourly, about a day in all
TIMEOUT_SECONDS = 10.0
BATCH = 50  # events delivered per round
Post = Callable[[str, bytes, dict[str, str]], int]  # (url, body, headers) -> HTTP status


def signature(secret: str, body: bytes) -> str:
    """The X-Kiln-Signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST with the standard library; the HTTP status, 0 when no answer came."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def deliver(sessions: sessionmaker[Session], url: str, secret: str, now: datetime, send: Post = post) -> int:
    """Deliver the events that are due; returns how many landed. Each event is POSTed outside any transaction
    and recorded after, so a slow receiver holds no lock; one that landed but whose record was lost is sent
    again, with the same X-Kiln-Delivery."""
    with sessions.begin() as session:
        due = [(e.id, e.kind, e.created_at, e.payload, e.attempts) for e in session.scalars(
            select(Event).where(Event.delivered_at.is_(None), Event.attempts < GIVE_UP_AFTER, Event.next_at <= now)
            .order_by(Event.id).limit(BATCH))]
    landed = 0
    for event_id, kind, created_at, payload, attempts in due:
        body = json.dumps({"id": event_id, "kind": kind, "created_at": created_at.isoformat() + "Z",
                           "data": payload}, separators=(",", ":")).encode()
        status = send(url, body, {"Content-Type": "application/json", "X-Kiln-Event": kind,
                                  "X-Kiln-Delivery": str(event_id), "X-Kiln-Signature": signature(secret, body)})
        with sessions.begin() as session:
            event = session.get(Event, event_id)
            assert event is not None
            event.attempts = attempts + 1
            if 200 <= status < 300:
                event.delivered_at, event.error = now, None
                landed += 1
            else:
                event.error = f"HTTP {status}" if status else "no answer"
                event.next_at = now + min(RETRY_BASE * 2 ** attempts, RETRY_CAP)
    return landed
