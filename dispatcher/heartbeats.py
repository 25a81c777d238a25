"""The workers' heartbeats, read from their Redis stream (schemas.messages.HEARTBEATS_STREAM) once a tick: every
entry added since the last tick in one command, each worker's latest kept, each dated by the stream's clock."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import redis
from pydantic import ValidationError

from schemas.messages import HEARTBEATS_KEPT, HEARTBEATS_STREAM, Heartbeat, heartbeat_in

log = logging.getLogger("kiln.dispatcher")


class HeartbeatStream:
    """Where the dispatcher has read the stream to. Entries are read from the last one recorded: a tick whose
    transaction failed reads its heartbeats again in the next."""

    def __init__(self, broker: redis.Redis, lookback: timedelta) -> None:
        """`lookback`: how far back the first read goes (the worker timeout: a dispatcher that starts, or starts
        again, hears the heartbeats that still count)."""
        self.broker, self.lookback = broker, lookback
        self.recorded_to: str | None = None  # the id of the last entry recorded
        self._read_to: str | None = None
        self.heard_since: datetime | None = None  # since when every read succeeded (None: the last one failed)

    def latest(self, now: datetime) -> list[tuple[Heartbeat, datetime]]:
        """Each worker's latest heartbeat since the last one recorded, with when it was added, by `now`'s clock:
        an entry's id is the Redis time it was added, so the age is the broker's own clock against itself, and a
        late tick or a dispatcher clock apart from the workers' dates it right. Raises redis' errors."""
        try:
            seconds, micros = self.broker.time()
            redis_ms = seconds * 1000 + micros // 1000
            after = self.recorded_to or f"{max(redis_ms - int(self.lookback.total_seconds() * 1000), 0)}-0"
            # RESP2: [[name, entries]], or nothing
            found: Any = self.broker.xread({HEARTBEATS_STREAM: after}, count=HEARTBEATS_KEPT)
        except redis.RedisError:
            self.heard_since = None
            raise
        if self.heard_since is None:
            self.heard_since = now
        entries: list[tuple[bytes, dict[bytes, bytes]]] = found[0][1] if found else []
        latest: dict[str, tuple[Heartbeat, datetime]] = {}
        for entry_id, fields in entries:
            try:
                beat = heartbeat_in(json.loads(fields[b"beat"]))
            except (KeyError, ValueError, ValidationError):  # not one a worker writes: dropped, the others count
                log.error("dropped a malformed heartbeat (stream entry %s)", entry_id.decode())
                continue
            added_ms = int(entry_id.split(b"-")[0])
            latest[beat.worker] = (beat, now - timedelta(milliseconds=max(redis_ms - added_ms, 0)))
        self._read_to = entries[-1][0].decode() if entries else self.recorded_to
        return list(latest.values())

    def recorded(self) -> None:
        """What the last `latest` returned is recorded: the next read starts after it."""
        self.recorded_to = self._read_to
