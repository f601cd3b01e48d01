"""
Log output: one JSON object per line for log shippers (the default for a
daemonized twistd), or twistd's own plain text (the default with C{-n}).

twistd starts its log observer after the plugin built the service, and
takes an L{ILogObserver} the application carries as a component instead of
its own: L{LogFormat} is the service that hands it over. Where the lines go
(C{--logfile}, stdout with C{-n}, C{twistd.log} otherwise) follows twistd's
own rules, so C{--logfile} and log rotation work as usual.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, formatEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer

RELAYED = "tickstock_relayed"
"""An event field holding a worker's own JSON record, written out as it is."""

_PLAIN = (str, int, float, bool, type(None))


class Lines(Protocol):
    """Where JSON lines go: a text stream, or twistd's rotating L{LogFile}."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


@implementer(ILogObserver)
class JSONLines:
    """
    Writes each event as one line of JSON: time (UTC, ISO 8601), level,
    namespace, the formatted message, the traceback of a logged failure,
    and the event's own plain fields (numbers, strings), so a log shipper
    can filter on them without parsing the message.
    """

    def __init__(self, out: Lines) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        relayed = event.get(RELAYED)
        if isinstance(relayed, dict):
            record = {**relayed, "worker": event.get("worker")}
        else:
            record = self.record(event)
        self._out.write(orjson.dumps(record, default=str).decode() + "\n")
        self._out.flush()

    @staticmethod
    def record(event: dict[str, Any]) -> dict[str, Any]:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
            .isoformat(timespec="milliseconds"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _PLAIN):
                record[key] = value
        return record


def log_format(chosen: str | None, twistd: Any) -> str:
    """C{--log-format}, else JSON when twistd runs as a daemon (no C{-n})."""
    if chosen:
        return chosen
    return "json" if twistd is not None and not twistd["nodaemon"] else "text"


def twistd_log_file(twistd: Any) -> Lines:
    """Where twistd itself would write: C{--logfile}, stdout with C{-n}, else twistd.log."""
    name = twistd["logfile"]
    if name == "-" or (twistd["nodaemon"] and not name):
        return sys.stdout
    log: LogFile = LogFile.fromFullPath(name or "twistd.log")
    return log


class LogFormat(MultiService):
    """
    The root twistd runs: it wraps the daemon's service and, when added to
    the application, gives twistd the JSON observer to log through.
    """

    def __init__(self, service: Any, observer: ILogObserver) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
