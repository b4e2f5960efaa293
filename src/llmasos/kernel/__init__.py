"""The kernel: boots a system from a manifest and keeps it running.

See ``llmasos.kernel.kernel`` for the kernel process itself and
``llmasos.kernel.forkserver`` for the template process replicas are forked
from.
"""

from llmasos.kernel.kernel import Kernel, boot

__all__ = ["Kernel", "boot"]
