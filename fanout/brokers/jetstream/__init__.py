"""NATS JetStream as the node's source of messages, split along nats.py's own seams.

- :mod:`.broker`: :class:`JetStreamBroker`, the lifecycle (connect, supervise,
  set up, status, publish);
- :mod:`.admin`: stream and consumer administration (JetStream API calls);
- :mod:`.consumer`: the pull consumer, the ingest hot path;
- :mod:`.history`: range reads for ``resume`` and gap fills.

Limits: ``history()`` reads through a short-lived ephemeral consumer per call
(8 at a time); filters that NATS cannot combine (overlapping patterns) are
applied on this side.
"""

from .admin import ConsumerInUse, LimitExceeded, PermissionDenied, StreamConfigConflict, consumer_name, format_epoch
from .broker import JetStreamBroker, MetricsHook

__all__ = ["JetStreamBroker", "StreamConfigConflict", "ConsumerInUse", "PermissionDenied", "LimitExceeded",
           "MetricsHook", "consumer_name", "format_epoch"]
