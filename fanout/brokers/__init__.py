"""Message sources for the hub: embedded bus or NATS JetStream."""

from .base import Broker, History, Message, Sink

__all__ = ["Broker", "History", "Message", "Sink"]
