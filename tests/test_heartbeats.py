"""Heartbeats through their Redis stream: each worker's latest, dated by the broker's clock, read again until
recorded."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis

from dispatcher.heartbeats import HeartbeatStream
from schemas.messages import HEARTBEATS_STREAM, PROTOCOL, Heartbeat
from tests.services import redis_server
from worker.outbox import send_heartbeat

NOW = datetime(2026, 12, 6, 12, 0, 0)


def beat(worker: str, **values: object) -> Heartbeat:
    return Heartbeat.model_validate({"worker": worker, "device": "cuda", "vram_gb": 8.0, "queues": ["q"], **values})


def test_each_workers_latest_heartbeat_dated_by_the_brokers_clock(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        broker = redis.Redis(port=server.port)
        seconds, micros = broker.time()
        now_ms = seconds * 1000 + micros // 1000
        # a heartbeat added 30 s ago by the broker's clock (ids are the time an entry was added)
        broker.xadd(HEARTBEATS_STREAM, {"beat": beat("w-old").model_dump_json()}, id=f"{now_ms - 30_000}-0")
        send_heartbeat(broker, beat("w1"))
        broker.xadd(HEARTBEATS_STREAM, {"beat": b"not json"})
        broker.xadd(HEARTBEATS_STREAM, {"something": b"else"})
        send_heartbeat(broker, beat("w2", protocol=PROTOCOL - 1))
        send_heartbeat(broker, beat("w1", rendering=["job-1"]))

        latest = {b.worker: (b, seen) for b, seen in HeartbeatStream(broker, timedelta(seconds=60)).latest(NOW)}
        assert sorted(latest) == ["w-old", "w1", "w2"]  # the malformed entries dropped, the others kept
        assert latest["w1"][0].rendering == ["job-1"]  # its latest of two
        assert latest["w2"][0].protocol == PROTOCOL - 1  # recorded as it came: the dispatcher says what is wrong
        assert timedelta(seconds=29) < NOW - latest["w-old"][1] < timedelta(seconds=32)
        assert NOW - latest["w1"][1] < timedelta(seconds=2)
        # a dispatcher starting now hears only the heartbeats that still count: those within the worker timeout
        assert sorted(b.worker for b, _ in HeartbeatStream(broker, timedelta(seconds=20)).latest(NOW)) == ["w1", "w2"]


def test_heartbeats_are_read_again_until_recorded(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        broker = redis.Redis(port=server.port)
        stream = HeartbeatStream(broker, timedelta(seconds=60))
        assert stream.latest(NOW) == []
        send_heartbeat(broker, beat("w1"))
        assert [b.worker for b, _ in stream.latest(NOW)] == ["w1"]
        # the tick's transaction failed: the next tick reads the same heartbeats again, and the new
        send_heartbeat(broker, beat("w2"))
        assert sorted(b.worker for b, _ in stream.latest(NOW)) == ["w1", "w2"]
        stream.recorded()
        assert stream.latest(NOW) == []
        send_heartbeat(broker, beat("w1", rendering=["job-2"]))
        assert [(b.worker, b.rendering) for b, _ in stream.latest(NOW)] == [("w1", ["job-2"])]


def test_the_stream_keeps_about_a_bounded_number_of_heartbeats(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        broker = redis.Redis(port=server.port)
        for i in range(12_000):
            send_heartbeat(broker, beat(f"w{i % 50}"))
        assert 10_000 <= broker.xlen(HEARTBEATS_STREAM) < 12_000


def test_hearing_starts_again_when_the_broker_comes_back(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        broker = redis.Redis(port=server.port, socket_timeout=2)
        stream = HeartbeatStream(broker, timedelta(seconds=60))
        assert stream.heard_since is None
        stream.latest(NOW)
        stream.latest(NOW + timedelta(seconds=1))
        assert stream.heard_since == NOW  # heard without a break since the first read
        server.stop()
        with pytest.raises(redis.RedisError):
            stream.latest(NOW + timedelta(seconds=2))
        assert stream.heard_since is None  # the reaper judges nobody by heartbeats meanwhile
        server.start()
        send_heartbeat(broker, beat("w1"))  # the stream starts empty again (no persistence): new entries are read
        assert [b.worker for b, _ in stream.latest(NOW + timedelta(seconds=30))] == ["w1"]
        assert stream.heard_since == NOW + timedelta(seconds=30)
