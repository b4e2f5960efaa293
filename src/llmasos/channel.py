"""Channels: bounded multi-producer, single-consumer queues in a heap.

The process that receives makes the channel, ``Channel.create(heap)``, and
passes ``channel.handle`` to its senders, who open it with
``Sender.open(heap, handle)``.  ``send`` copies a bytes-like message into a
slot (or, above ``max_inline`` bytes, into a block of the heap) and sends a
``Buffer`` as its handle: the receiver gets the very same block, now owned by
it, and nothing of the payload is copied.  ``recv`` returns ``bytes`` for
bytes sent and a ``Buffer`` for a buffer sent.

Waiting: ``recv`` spins for ``spin_us`` microseconds, then sleeps on a futex
with the GIL released.  A sender makes the wake-up call only when the
receiver sleeps.  Every blocking call takes ``timeout`` in seconds and raises
``TimeoutError`` when it runs out; ``recv_nowait`` / ``send_nowait`` (or
``block=False``) raise ``BlockingIOError`` instead of waiting.  A channel
whose receiver died is closed: its senders get ``ChannelClosed``.
"""

from __future__ import annotations

from llmasos import _core


class Channel(_core.Channel):
    """The receiving end of a channel."""

    @classmethod
    def create(
        cls, heap: _core.Heap, capacity: int = 1024, slot_size: int = 256
    ) -> Channel:
        """Make a channel received by this process.

        ``capacity`` (rounded up to a power of two) slots of ``slot_size``
        bytes, 16 of which are the slot's header.
        """
        return cls._create(heap, capacity, slot_size)

    def sender(self) -> Sender:
        """A sending end in this process (other processes use Sender.open)."""
        return Sender.open(self.heap, self.handle)

    def __repr__(self) -> str:
        return f"<llmasos.Channel {self.handle:#x}>"


class Sender(_core.Sender):
    """A sending end of a channel."""

    @classmethod
    def open(cls, heap: _core.Heap, handle: int) -> Sender:
        """Open the channel ``handle`` of ``heap`` for sending."""
        return cls._open(heap, handle)

    def __repr__(self) -> str:
        return f"<llmasos.Sender {self.handle:#x}>"
