"""Scheduling: run-queue policies and a simulator that replays traces.

`policies` holds the run queues a worker picks its next request from;
`simulate` replays a CSV trace through them in virtual time. The design and
the costs are described in docs/scheduling.md.
"""

from llmasos.sched.policies import (
    POLICY_NAMES,
    DeadlineExceeded,
    DurationEstimator,
    EdfPolicy,
    FifoPolicy,
    HrrnPolicy,
    Policy,
    PriorityPolicy,
    Request,
    RunQueueStats,
    UnknownPolicyError,
    make_policy,
    response_ratio,
)

__all__ = [
    "POLICY_NAMES",
    "DeadlineExceeded",
    "DurationEstimator",
    "EdfPolicy",
    "FifoPolicy",
    "HrrnPolicy",
    "Policy",
    "PriorityPolicy",
    "Request",
    "RunQueueStats",
    "UnknownPolicyError",
    "make_policy",
    "response_ratio",
]
