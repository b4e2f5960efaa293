"""Behaviour of the run-queue policies on hand-built queues."""

import functools
import heapq
import pickle
import random

import pytest

from llmasos.errors import LLMasOSError
from llmasos.sched import (
    POLICY_NAMES,
    DeadlineExceeded,
    DurationEstimator,
    HrrnPolicy,
    PriorityPolicy,
    Request,
    UnknownPolicyError,
    make_policy,
    response_ratio,
)


def drain(policy, now=0.0):
    """Pop every runnable request at `now` and return their names in order."""
    names = []
    while (request := policy.pop(now)) is not None:
        names.append(request.name)
    return names


def test_fifo_pops_in_arrival_order_whatever_the_push_order():
    policy = make_policy("fifo")
    for name, arrival in [("c", 3.0), ("a", 1.0), ("b", 2.0)]:
        policy.push(Request(name, arrival))

    order = drain(policy, now=5.0)

    assert order == ["a", "b", "c"]


def test_fifo_breaks_arrival_ties_by_name_then_push_order():
    policy = make_policy("fifo")
    first = Request("same", 1.0, payload="first")
    second = Request("same", 1.0, payload="second")
    for request in [Request("b", 1.0), first, second, Request("a", 1.0)]:
        policy.push(request)

    popped = [policy.pop(2.0) for _ in range(4)]

    assert [r.name for r in popped] == ["a", "b", "same", "same"]
    assert popped[2] is first and popped[3] is second


def test_priority_pops_highest_first_and_arrival_order_within_a_level():
    policy = make_policy("priority")
    for name, arrival, priority in [
        ("low", 0.0, 1),
        ("high-late", 2.0, 5),
        ("high-early", 1.0, 5),
        ("mid", 0.5, 3),
    ]:
        policy.push(Request(name, arrival, priority=priority))

    order = drain(policy, now=3.0)

    assert order == ["high-early", "high-late", "mid", "low"]


def test_priority_uses_method_default_unless_the_call_sets_its_own():
    policy = PriorityPolicy(method_priorities={"admin": 9, "batch": -1})
    policy.push(Request("batch-call", 0.0, method="batch"))
    policy.push(Request("plain-call", 1.0, method="other"))
    policy.push(Request("admin-call", 2.0, method="admin"))
    policy.push(Request("urgent-batch", 3.0, method="batch", priority=10))

    order = drain(policy, now=4.0)

    assert order == ["urgent-batch", "admin-call", "plain-call", "batch-call"]


def test_edf_pops_earliest_deadline_first_and_undated_requests_last():
    policy = make_policy("edf")
    policy.push(Request("undated-1", 0.0))
    policy.push(Request("late", 0.0, deadline=30.0))
    policy.push(Request("soon", 1.0, deadline=10.0))
    policy.push(Request("undated-2", 1.0))

    order = drain(policy, now=2.0)

    assert order == ["soon", "late", "undated-1", "undated-2"]


def test_edf_drops_expired_requests_without_returning_them():
    policy = make_policy("edf")
    policy.push(Request("gone", 0.0, deadline=5.0))
    policy.push(Request("also-gone", 0.0, deadline=6.0))
    policy.push(Request("alive", 0.0, deadline=20.0))

    first = policy.pop(7.0)
    expired = policy.take_expired()

    assert first is not None and first.name == "alive"
    assert [r.name for r in expired] == ["gone", "also-gone"]
    assert policy.take_expired() == []
    assert len(policy) == 0


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_drops_a_request_whose_deadline_is_reached(name):
    policy = make_policy(name)
    policy.push(Request("expired", 0.0, duration=1.0, deadline=4.0))

    popped = policy.pop(4.0)

    assert popped is None
    assert [r.name for r in policy.take_expired()] == ["expired"]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_runs_a_request_just_before_its_deadline(name):
    policy = make_policy(name)
    policy.push(Request("in-time", 0.0, duration=1.0, deadline=4.0))

    popped = policy.pop(3.999)

    assert popped is not None and popped.name == "in-time"
    assert policy.take_expired() == []


def test_deadline_exceeded_names_the_request_and_is_an_llmasos_error():
    request = Request("get-user", 1.0, deadline=2.5)

    error = DeadlineExceeded(request, 3.0)
    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(error, LLMasOSError)
    assert "'get-user'" in str(error) and "2.5" in str(error)
    assert copy.request == request and copy.now == 3.0


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_peek_returns_the_next_pop_and_leaves_it_queued(name):
    policy = make_policy(name)
    policy.push(Request("a", 0.0, duration=2.0))
    policy.push(Request("b", 1.0, duration=2.0))

    peeked = policy.peek(1.0)

    assert len(policy) == 2
    assert peeked is policy.pop(1.0)
    assert len(policy) == 1


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_reads_the_injected_clock_when_no_time_is_given(name):
    now = [0.0]
    policy = make_policy(name, clock=lambda: now[0])
    policy.push(Request("r", 0.0, duration=1.0, deadline=5.0))
    now[0] = 6.0

    popped = policy.pop()

    assert popped is None
    assert [r.name for r in policy.take_expired()] == ["r"]


def test_policy_stats_count_pushes_starts_and_expiries():
    policy = make_policy("fifo")
    policy.push(Request("a-dropped", 0.0, deadline=1.0))
    policy.push(Request("b-run", 0.0))
    policy.push(Request("c-waiting", 1.0))

    policy.pop(2.0)
    stats = policy.stats()

    assert (stats.policy, stats.queued, stats.pushed) == ("fifo", 1, 3)
    assert (stats.started, stats.expired) == (1, 1)


def test_make_policy_rejects_an_unknown_name():
    with pytest.raises(UnknownPolicyError, match="choose one of fifo, priority"):
        make_policy("lottery")


def test_request_rejects_a_duration_that_is_not_positive():
    with pytest.raises(ValueError, match="'r'"):
        Request("r", 0.0, duration=0.0)


def test_response_ratio_grows_with_wait_and_favours_short_requests():
    fresh = response_ratio(0.0, 5.0)
    waited = response_ratio(10.0, 5.0)
    short = response_ratio(10.0, 1.0)

    assert fresh == 1.0
    assert waited == 3.0
    assert short == 11.0


def test_inverse_formula_would_rank_a_longer_wait_lower():
    # P = 1 / (T + D) falls as the wait T grows: the request that has waited
    # 10 s scores 1/15, below a newcomer's 1/5. The response ratio orders
    # them the other way (3.0 against 1.0), which is why hrrn uses it.
    def inverse(waited, duration):
        return 1 / (waited + duration)

    assert inverse(10.0, 5.0) < inverse(0.0, 5.0)
    assert response_ratio(10.0, 5.0) > response_ratio(0.0, 5.0)


def test_hrrn_prefers_the_shorter_request_when_waits_are_equal():
    policy = make_policy("hrrn")
    policy.push(Request("long", 0.0, duration=10.0))
    policy.push(Request("short", 0.0, duration=1.0))

    order = drain(policy, now=2.0)

    assert order == ["short", "long"]


def test_hrrn_prefers_a_long_wait_over_a_short_duration():
    # At t=20: old waited 20 with D=10, ratio 3.0; new waited 1 with D=1,
    # ratio 2.0. The old long request goes first.
    policy = make_policy("hrrn")
    policy.push(Request("old", 0.0, duration=10.0))
    policy.push(Request("new", 19.0, duration=1.0))

    order = drain(policy, now=20.0)

    assert order == ["old", "new"]


def test_hrrn_breaks_equal_ratios_by_arrival_then_name():
    # At t=4, x (waited 2, D=2) and y (waited 4, D=4) both have ratio 2.0.
    policy = make_policy("hrrn")
    policy.push(Request("x", 2.0, duration=2.0))
    policy.push(Request("y", 0.0, duration=4.0))
    policy.push(Request("w", 0.0, duration=4.0))

    order = drain(policy, now=4.0)

    assert order == ["w", "y", "x"]


def run_stream(policy, long_priority=None):
    """Feed a worker a stream of short requests with one long request waiting.

    The worker runs "first" over [0, 1). From then on it picks at each whole
    time t, and a short request (D=1) has arrived at t - 0.5, so one is
    always waiting. The long request (D=10) arrived at 0.5. Returns the time
    the long request starts, or None if it never does within 100 picks.
    """
    policy.push(Request("first", 0.0, duration=1.0, priority=1))
    policy.pop(0.0)
    policy.push(Request("long", 0.5, duration=10.0, priority=0))

    for now in range(1, 100):
        short = Request(f"short-{now:03d}", now - 0.5, duration=1.0, priority=1)
        policy.push(short)
        if policy.pop(float(now)).name == "long":
            return now
    return None


def test_hrrn_long_request_eventually_beats_a_stream_of_short_ones():
    # At time t the waiting short request has ratio (0.5 + 1) / 1 = 1.5 and
    # the long one (t - 0.5 + 10) / 10. The shorts lead while t - 0.5 < 5
    # and the long one leads from t = 6 on: 1 + 5.5 / 10 = 1.55 > 1.5.
    started = run_stream(make_policy("hrrn"))

    assert started == 6


def test_priority_lets_a_stream_of_higher_priority_requests_starve_others():
    started = run_stream(make_policy("priority"))

    assert started is None


def test_duration_estimator_uses_the_prior_until_the_first_measurement():
    estimator = DurationEstimator(default_prior=0.5, priors={"slow": 2.0}, alpha=0.5)

    before = (estimator.estimate("slow"), estimator.estimate("other"))
    estimator.record("slow", 1.0)
    first = estimator.estimate("slow")
    estimator.record("slow", 3.0)

    assert before == (2.0, 0.5)
    assert first == 1.0
    assert estimator.estimate("slow") == 2.0


def test_hrrn_orders_method_calls_by_their_learned_durations():
    estimator = DurationEstimator()
    estimator.record("report", 1.0)
    estimator.record("ping", 0.01)
    policy = HrrnPolicy(estimator=estimator)
    policy.push(Request("report-call", 0.0, method="report"))
    policy.push(Request("ping-call", 0.0, method="ping"))

    order = drain(policy, now=0.5)

    assert order == ["ping-call", "report-call"]


def naive_hrrn_key(item, now, estimator):
    """Reference hrrn order: -T / D, then arrival, name and push order."""
    seq, r = item
    d = r.duration if r.duration is not None else estimator.estimate(r.method)
    return (-(now - r.arrival) / d, r.arrival, r.name, seq)


def naive_hrrn_order(requests, estimator, times):
    """Reference hrrn: scan every waiting request at each pick."""
    waiting = list(enumerate(requests))
    order = []
    for now in times:
        key = functools.partial(naive_hrrn_key, now=now, estimator=estimator)
        best = min(waiting, key=key)
        waiting.remove(best)
        order.append(best[1].name)
    return order


def test_hrrn_picks_like_a_full_scan_with_thousands_queued():
    rng = random.Random(7)
    estimator = DurationEstimator()
    for method in range(12):
        estimator.record(f"m{method}", rng.uniform(0.001, 0.1))
    requests = [
        Request(
            f"r{i:04d}",
            rng.uniform(0.0, 10.0),
            duration=rng.choice([None, None, 0.02, 0.05]),
            method=f"m{rng.randrange(12)}",
        )
        for i in range(3000)
    ]
    times = [10.0 + 0.01 * i for i in range(len(requests))]
    policy = HrrnPolicy(estimator=estimator)
    for request in requests:
        policy.push(request)

    order = [policy.pop(now).name for now in times]

    assert order == naive_hrrn_order(requests, estimator, times)


def test_heap_policies_pick_like_a_full_sort_with_thousands_queued():
    rng = random.Random(11)
    requests = [
        Request(f"r{i:04d}", float(rng.randrange(50)), priority=rng.randrange(5))
        for i in range(3000)
    ]
    policy = make_policy("priority")
    for request in requests:
        policy.push(request)

    order = drain(policy, now=100.0)

    ranked = [(-r.priority, r.arrival, r.name, i) for i, r in enumerate(requests)]
    heapq.heapify(ranked)
    expected = [requests[heapq.heappop(ranked)[3]].name for _ in requests]
    assert order == expected
