"""
Every interface the upper floors (deliver, web, ops) declare is provided:
verifyObject checks each declared method and attribute, so a declaration
cannot drift from the class. Broadcaster (IEventSink) and ClientProtocol
(IClient) are checked in test_units.py.
"""

from __future__ import annotations

import io

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver
from zope.interface.verify import verifyObject

from tickstock.domain.interfaces import IComponent
from tickstock.ops.canary import Canary
from tickstock.ops.logs import JSONLines
from tickstock.web.websocket import ClientProtocol


def test_client_protocol_is_its_transports_push_producer():
    """It registers itself as the transport's producer (see tickstock.web.websocket)."""
    verifyObject(IPushProducer, ClientProtocol())


def test_json_lines_is_a_log_observer():
    verifyObject(ILogObserver, JSONLines(io.StringIO()))


def test_canary_is_a_component():
    canary = Canary(Clock(), lambda channel, payload: succeed(None), "tickstock.canary.n", 1.0)
    verifyObject(IComponent, canary)
