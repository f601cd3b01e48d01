"""
Every class that declares an interface in the lower floors (domain,
connections, ingest, store, jobs, sim, and the command-line tools)
provides it: verifyObject on one instance of each, built without
connecting to anything. A class that declares an interface and is not
built here fails the test, so a new implementation gets its check.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementedBy
from zope.interface.verify import verifyObject

import tickstock
from tickstock.config import parse_redis_url
from tickstock.connections.jwks import JWKS
from tickstock.connections.redis import RedisLink
from tickstock.connections.sentinel import SentinelEndpoint
from tickstock.deliver.latest import Latest
from tickstock.history.memory import MemoryHistory
from tickstock.history.redis.current import CurrentValues
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.pubsub import RedisPubSubSource
from tickstock.ingest.router import Router
from tickstock.ingest.streams import RedisStreamSource
from tickstock.jobs.backtests import Jobs
from tickstock.store.cache import MemoryCache, RedisCache
from tickstock.store.listen import ProducerRowListener
from tickstock.store.memory import MemoryStore
from tickstock.store.persist import Persister
from tickstock.store.postgres import PostgresStore

FLOORS = ("domain", "connections", "ingest", "store", "jobs", "sim", "cli")
ADDRESS = parse_redis_url("redis://127.0.0.1:1/0")
DSN = "postgresql://tickstock@127.0.0.1:1/tickstock"


def implementations() -> list[Any]:
    """One instance of each implementation; none connects until started, nor writes."""
    reactor = MemoryReactorClock()
    link = RedisLink(reactor, ADDRESS, 10)
    store, history = MemoryStore(reactor), MemoryHistory(reactor, 10, 60, 10)
    return [
        link,
        SentinelEndpoint(reactor, [("127.0.0.1", 1)], "mymaster"),
        MemoryBus(),
        JWKS(reactor, "https://idp.example.com/certs", 300.0),
        RedisPubSubSource(reactor, ADDRESS),
        RedisStreamSource(reactor, ADDRESS, "node-1"),
        MemoryStore(reactor),
        PostgresStore(reactor, DSN, None, 1.0),
        ProducerRowListener(reactor, reactor, DSN, 1.0, lambda channel, raw: None),
        MemoryCache(reactor),
        RedisCache(link, reactor),
        CurrentValues(reactor, link, 10),
        Latest(),
        Router(reactor, history, link),
        Persister(reactor, store, "n:1", 1.0, 10, "spool-never-made"),  # made when it spills
        Jobs(reactor, store, history, link, lambda channel, raw: succeed(None), per_user=1,
             timeout=1.0),
    ]


def declaring_classes() -> set[type]:
    """The classes of these floors' modules that declare an interface themselves."""
    found: set[type] = set()
    for floor in FLOORS:
        package = importlib.import_module(f"{tickstock.__name__}.{floor}")
        names = [package.__name__] + [
            info.name for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
        for name in names:
            module = importlib.import_module(name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == name and list(implementedBy(cls).declared):
                    found.add(cls)
    return found


@pytest.mark.parametrize("obj", implementations(), ids=lambda obj: type(obj).__name__)
def test_provides_what_it_declares(obj: Any) -> None:
    """Each interface the class declares (and those it extends) is provided."""
    declared = list(implementedBy(type(obj)).declared)
    assert declared
    for interface in declared:
        verifyObject(interface, obj)


def test_every_implementation_is_checked() -> None:
    """No class of these floors declares an interface without being built above."""
    checked = {type(obj) for obj in implementations()}
    assert declaring_classes() - checked == set()
