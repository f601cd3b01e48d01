"""twistd plugin: C{twistd tickstock}. Imports nothing that imports the reactor."""

from twisted.application.service import ServiceMaker

tickstock = ServiceMaker(
    "TickStock",
    "tickstock.tap",
    "Real-time market analytics: Redis events to WebSocket subscribers.",
    "tickstock",
)
