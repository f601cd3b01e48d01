"""
Every interface the upper floors (deliver, web, ops) declare is provided:
verifyObject checks each declared method and attribute, so a declaration
cannot drift from the class. Broadcaster (IEventSink) and ClientProtocol
(IClient) are checked in test_units.py. The parts are real, over the
memory store, history and bus.
"""

from __future__ import annotations

import io

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from tickstock.deliver.auth import anonymous
from tickstock.deliver.broadcast import Broadcaster
from tickstock.deliver.gateway import Gateway
from tickstock.deliver.overload import Overload
from tickstock.deliver.throttle import TickThrottle
from tickstock.deliver.universes import Universes
from tickstock.domain.interfaces import IComponent, IMetered, IReporting
from tickstock.history.memory import MemoryHistory
from tickstock.ingest.memory import MemoryBus
from tickstock.ingest.router import Router
from tickstock.jobs.backtests import Jobs
from tickstock.ops.canary import Canary
from tickstock.ops.logs import JSONLines
from tickstock.store.cache import MemoryCache
from tickstock.store.memory import MemoryStore
from tickstock.store.persist import Persister
from tickstock.web.api import ApiResource
from tickstock.web.site import SecureSite
from tickstock.web.websocket import ClientProtocol, StreamFactory


def test_client_protocol_is_its_transports_push_producer():
    """It registers itself as the transport's producer (see tickstock.web.websocket)."""
    verifyObject(IPushProducer, ClientProtocol())


def test_json_lines_is_a_log_observer():
    verifyObject(ILogObserver, JSONLines(io.StringIO()))


def test_canary_is_a_component():
    canary = Canary(Clock(), lambda channel, payload: succeed(None), "tickstock.canary.n", 1.0)
    verifyObject(IComponent, canary)


def test_the_parts_health_shows_report_their_own_status(tmp_path):
    """C{/health} places what each part's status() says (tickstock.ops.health)."""
    clock = Clock()
    history = MemoryHistory(clock, 10, 60, 10)
    broadcaster = Broadcaster(lambda frame: frame)
    store = MemoryStore(clock)
    for metered in (Router(clock, history, MemoryBus()), broadcaster,
                    Gateway(clock, broadcaster, history, anonymous, 10, hello_timeout=1.0)):
        verifyObject(IMetered, metered)
    stream = StreamFactory(allowed_origins=(), max_message_size=1024, queue_limit=10,
                           ping_interval=0, ping_timeout=1, handshake_timeout=1, clock=clock)
    for part in (stream, Overload(clock), TickThrottle(clock, 1.0, lambda event: None),
                 Universes(store, broadcaster),
                 Persister(clock, store, "n:1", 1.0, 10, str(tmp_path)),
                 Jobs(clock, store, history, MemoryBus(), lambda channel, raw: succeed(None),
                      per_user=1, timeout=1.0),
                 ApiResource(store, MemoryCache(clock), anonymous, 1.0, 1.0,
                             clock, 1.0),
                 SecureSite(Resource())):
        verifyObject(IReporting, part)
