"""The exception tree of LLMasOS.

Every error LLMasOS raises on purpose derives from ``LLMasOSError``.  Errors
that mean "your request could not be done" (bad input, resource exhausted,
peer gone) carry a specific class; ``InternalError`` alone means a broken
invariant, which is our bug and should be reported.

    LLMasOSError
     +-- InternalError
     +-- HeapError
     |    +-- LayoutMismatch
     |    +-- InvalidHandle           (also a ValueError)
     |    |    +-- StaleHandle        (the block was freed: use after free)
     |    +-- DoubleFree
     |    +-- HugePagesUnavailable
     +-- ChannelClosed                (also a BrokenPipeError)
     +-- NoSystem                     (this process belongs to no system)
     +-- ManifestError                (llmasos.manifest; also a ValueError)
     +-- DeadlineExceeded             (llmasos.sched)
     +-- UnknownPolicyError           (llmasos.sched; also a ValueError)

Failures with a built-in class a Python user already expects keep it:
exhaustion raises ``MemoryError``, waits that run out raise ``TimeoutError``,
a full or empty channel asked not to block raises ``BlockingIOError``, and
freeing or sending a buffer that memoryviews still see raises ``BufferError``.
"""


class LLMasOSError(Exception):
    """Root of every error that LLMasOS raises on purpose."""


class InternalError(LLMasOSError):
    """A broken invariant inside LLMasOS: a bug, please report it."""


class HeapError(LLMasOSError):
    """A heap could not be created, attached or used as asked."""


class LayoutMismatch(HeapError):
    """The shared heap was made by an incompatible version of LLMasOS."""


class InvalidHandle(HeapError, ValueError):
    """A handle names no live block of this heap (forged or foreign)."""


class StaleHandle(InvalidHandle):
    """The block this handle named was freed: a use after free."""


class DoubleFree(HeapError):
    """A block was freed twice."""


class HugePagesUnavailable(HeapError):
    """Huge pages were asked for but the machine has none to give."""


class ChannelClosed(LLMasOSError, BrokenPipeError):
    """The channel's receiver is gone or closed it."""


class NoSystem(LLMasOSError):
    """This process does not belong to an LLMasOS system."""
