"""
C{tickstock-sim}: the producer simulator as a process of its own, talking to
TickStock through Redis exactly as the real analytics engine does: it
publishes events of every kind and answers backtest jobs (and cancels, read
on C{tickstock.jobs.cancel} and C{tickstock.jobs.control}). With
C{--dialect upstream} it publishes in the real producer's shapes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from tickstock.config import parse_redis_url
from tickstock.domain.topics import CANCEL_CHANNEL, CONTROL_CHANNEL, JOBS_CHANNEL

_log = Logger(namespace="tickstock-sim")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tickstock-sim",
        description="Publish realistic producer events to Redis and answer backtest jobs.",
    )
    parser.add_argument("--redis", required=True, help="redis://[:password@]host[:port][/db]")
    parser.add_argument("--mode", choices=("pubsub", "streams"), default="pubsub",
                        help="PUBLISH events (pubsub, default) or XADD them (streams)")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")
    parser.add_argument("--symbols", type=int, default=20, help="how many symbols (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (default: run until stopped)")
    parser.add_argument("--step-interval", type=float, default=0.5,
                        help="seconds between a backtest's progress steps (default 0.5)")
    parser.add_argument("--dialect", choices=("tickstock", "upstream"), default="tickstock",
                        help="tickstock: TickStock's canonical flat events (default); upstream: "
                             "the real producer's shapes, mixed (docs/producers.md)")
    args = parser.parse_args(argv)
    try:
        args.address = parse_redis_url(args.redis)
    except ValueError as error:
        parser.error(f"--redis: {error}")
    if not 0 < args.rate <= 100_000:
        parser.error("--rate: must be more than 0 and at most 100000")
    if not 1 <= args.symbols <= 10_000:
        parser.error("--symbols: must be between 1 and 10000")
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from tickstock.connections.redis import RedisLink
    from tickstock.ingest.pubsub import RedisPubSubSource
    from tickstock.sim.producer import OutageQuietPublish, simulated_producer

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "big")
    link = RedisLink(reactor, args.address, deadletter_max=0, streams=args.mode == "streams")
    publish = OutageQuietPublish(link.publish)
    runner, producer = simulated_producer(
        reactor, publish, rate=args.rate, symbols=args.symbols,
        upstream=args.dialect == "upstream", per_symbol_ticks=args.mode == "pubsub",
        seed=seed, step_interval=args.step_interval)
    assert producer is not None  # --rate is positive
    jobs = RedisPubSubSource(reactor, args.address,
                             channels=[JOBS_CHANNEL, CANCEL_CHANNEL, CONTROL_CHANNEL])
    jobs.listen(lambda channel, payload, key: (
        runner.handle_job(payload) if channel == JOBS_CHANNEL else runner.handle_control(payload)
    ))
    link.startService()
    jobs.startService()
    _log.info("publishing {rate:g} events/s over {n} symbols to {redis} ({dialect} dialect)",
              rate=args.rate, n=args.symbols, redis=str(args.address), dialect=args.dialect)
    producer.start()
    done: Deferred[None] = Deferred()

    def finish() -> None:
        if not done.called:
            done.callback(None)

    reactor.addSystemEventTrigger("before", "shutdown", finish)
    if args.duration:
        reactor.callLater(args.duration, finish)
    await done
    producer.stop()
    runner.stop()
    _log.info("published {n} events ({failed} failed)", n=producer.published, failed=publish.failed)
    await jobs.stopService()
    await link.stopService()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))
