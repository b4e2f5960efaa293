"""The scheduling simulator and the `llmasos sched simulate` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmasos.cli import main
from llmasos.sched import POLICY_NAMES
from llmasos.sched.simulate import TraceError, load_trace, parse_trace, simulate

REPO = Path(__file__).resolve().parents[2]

# Stallings' five-process example (Operating Systems, the uniprocessor
# scheduling chapter).
TEXTBOOK_TRACE = """\
name,arrival,duration
A,0,3
B,2,6
C,4,4
D,6,5
E,8,2
"""


def write_trace(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def finishes(result):
    return {run.name: run.finish for run in result.runs}


def test_simulate_fifo_matches_the_textbook_example():
    # By hand: A runs 0-3; B arrived at 2, runs 3-9; C 9-13; D 13-18; E 18-20.
    # Turnarounds 3, 7, 9, 12, 12: mean 43 / 5 = 8.6. Normalised 3/3, 7/6,
    # 9/4, 12/5, 12/2 = 1, 1.167, 2.25, 2.4, 6: mean 12.817 / 5 = 2.563.
    requests = parse_trace(TEXTBOOK_TRACE.splitlines())

    result = simulate(requests, "fifo")

    assert finishes(result) == {"A": 3, "B": 9, "C": 13, "D": 18, "E": 20}
    assert [run.turnaround for run in result.runs] == [3, 7, 9, 12, 12]
    assert result.mean_turnaround == pytest.approx(8.6)
    assert result.mean_normalised_turnaround == pytest.approx(12.8166667 / 5)


def test_simulate_hrrn_matches_the_textbook_example():
    # By hand, ratio = (waited + D) / D at each free moment:
    #   t=0: only A -> A runs 0-3.
    #   t=3: only B (arrived 2) -> B runs 3-9.
    #   t=9: C (5 + 4) / 4 = 2.25, D (3 + 5) / 5 = 1.6, E (1 + 2) / 2 = 1.5
    #        -> C runs 9-13.
    #   t=13: D (7 + 5) / 5 = 2.4, E (5 + 2) / 2 = 3.5 -> E runs 13-15.
    #   t=15: D runs 15-20.
    # Turnarounds 3, 7, 9, 14, 7: mean 40 / 5 = 8.0. Normalised 1, 1.167,
    # 2.25, 2.8, 3.5: mean 10.717 / 5 = 2.143.
    requests = parse_trace(TEXTBOOK_TRACE.splitlines())

    result = simulate(requests, "hrrn")

    assert finishes(result) == {"A": 3, "B": 9, "C": 13, "D": 20, "E": 15}
    assert [run.start for run in result.runs] == [0, 3, 9, 15, 13]
    assert result.mean_turnaround == pytest.approx(8.0)
    assert result.mean_normalised_turnaround == pytest.approx(10.7166667 / 5)


def test_simulate_priority_runs_higher_priorities_first_when_the_worker_frees():
    trace = "name,arrival,duration,priority\nA,0,2,0\nB,1,1,1\nC,1,1,5\n"

    result = simulate(parse_trace(trace.splitlines()), "priority")

    assert finishes(result) == {"A": 2, "C": 3, "B": 4}


def test_simulate_edf_drops_requests_whose_deadline_came_first():
    # A occupies the worker until 4. B's deadline (3) has passed by then and
    # it is dropped; C's (10) has not.
    trace = "name,arrival,duration,deadline\nA,0,4,\nB,1,1,3\nC,1,1,10\n"

    result = simulate(parse_trace(trace.splitlines()), "edf")

    assert finishes(result) == {"A": 4, "C": 5}
    assert [(d.name, d.dropped_at) for d in result.drops] == [("B", 4)]
    assert result.as_dict()["deadline_misses"] == 1


def test_simulate_marks_requests_that_finish_after_their_deadline_late():
    trace = "name,arrival,duration,deadline\nA,0,5,3\n"

    result = simulate(parse_trace(trace.splitlines()), "edf")

    assert result.late == 1 and result.runs[0].late


def test_simulate_idle_worker_waits_for_the_next_arrival():
    trace = "name,arrival,duration\nA,0,1\nB,5,2\n"

    result = simulate(parse_trace(trace.splitlines()), "fifo")

    assert [(run.start, run.finish) for run in result.runs] == [(0, 1), (5, 7)]


@pytest.mark.parametrize("policy", ["fifo", "priority", "hrrn", "edf"])
def test_simulate_ties_go_to_earlier_arrival_then_first_name(policy):
    trace = "name,arrival,duration\nbusy,0,2\nzed,1,1\nalpha,1,1\nearly,0.5,1\n"

    result = simulate(parse_trace(trace.splitlines()), policy)

    starts = sorted((run.start, run.name) for run in result.runs)
    assert [name for _, name in starts] == ["busy", "early", "alpha", "zed"]


def test_load_trace_accepts_any_column_order_and_blank_optional_fields(tmp_path):
    path = write_trace(
        tmp_path, "duration, Name ,arrival,deadline,priority\n2,x,0,,\n\n1,y,1,9,3\n"
    )

    requests = load_trace(path)

    assert [(r.name, r.arrival, r.duration) for r in requests] == [
        ("x", 0.0, 2.0),
        ("y", 1.0, 1.0),
    ]
    assert (requests[0].deadline, requests[0].priority) == (None, None)
    assert (requests[1].deadline, requests[1].priority) == (9.0, 3)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("name,arrival,duration\nA,0,3\nB,x,6\n", 3, "column 2 (arrival)"),
        ("name,arrival,duration\nA,0,0\n", 2, "a duration > 0"),
        ("name,arrival,duration\nA,-1,3\n", 2, "an arrival time >= 0"),
        ("name,arrival,duration\nA,0\n", 2, "expected 3 fields"),
        ("name,arrival,duration,priority\nA,0,1,high\n", 2, "integer priority"),
        ("name,arrival,duration\nA,0,nan\n", 2, "found 'nan'"),
        ("name,arrival,length\nA,0,3\n", 1, "unknown column 'length'"),
        ("name,arrival\nA,0\n", 1, "missing column 'duration'"),
        ("name,arrival,name\nA,0,3\n", 1, "'name' appears twice"),
        ("name,arrival,duration\nA,0,3\n\nA,1,3\n", 4, "already appears on line 2"),
    ],
    ids=[
        "bad-number",
        "zero-duration",
        "negative-arrival",
        "short-row",
        "bad-priority",
        "nan",
        "unknown-column",
        "missing-column",
        "duplicate-column",
        "duplicate-name",
    ],
)
def test_load_trace_error_names_the_file_line_and_problem(
    tmp_path, text, line, message
):
    path = write_trace(tmp_path, text)

    with pytest.raises(TraceError) as caught:
        load_trace(path)

    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text", ["", "\n\n", "name,arrival,duration\n"], ids=["empty", "blank", "header"]
)
def test_load_trace_rejects_a_trace_without_requests(tmp_path, text):
    path = write_trace(tmp_path, text)

    with pytest.raises(TraceError, match=r"no requests|empty"):
        load_trace(path)


def test_load_trace_reports_a_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot read the trace"):
        load_trace(tmp_path / "absent.csv")


def test_docs_example_trace_gives_the_outcomes_the_docs_describe():
    requests = load_trace(REPO / "docs" / "examples" / "trace.csv")

    results = {name: simulate(requests, name) for name in POLICY_NAMES}

    assert [d.name for d in results["fifo"].drops] == ["E"]
    assert [r.name for r in results["priority"].runs if r.late] == ["C"]
    assert finishes(results["hrrn"]) == {"A": 3, "B": 9, "C": 13, "D": 20, "E": 15}
    assert finishes(results["edf"]) == finishes(results["hrrn"])


EXPECTED_FIFO_TABLE = """\
fifo: 5 run, 0 dropped, 0 late
name  arrival  duration  start  finish  turnaround  normalised
A           0         3      0       3           3        1.00
B           2         6      3       9           7        1.17
C           4         4      9      13           9        2.25
D           6         5     13      18          12        2.40
E           8         2     18      20          12        6.00
mean                                          8.60        2.56
"""


def test_cli_simulate_prints_the_table_of_one_policy(tmp_path, capsys):
    path = write_trace(tmp_path, TEXTBOOK_TRACE)

    status = main(["sched", "simulate", str(path), "--policy", "fifo"])

    captured = capsys.readouterr()
    assert status == 0
    assert captured.out == EXPECTED_FIFO_TABLE
    assert captured.err == ""


def test_cli_simulate_all_prints_every_policy_and_a_summary(tmp_path, capsys):
    path = write_trace(tmp_path, TEXTBOOK_TRACE)

    status = main(["sched", "simulate", str(path)])

    out = capsys.readouterr().out
    assert status == 0
    for name in ["fifo:", "priority:", "hrrn:", "edf:", "summary"]:
        assert f"\n{name}" in f"\n{out}"
    assert "hrrn                 8.00             2.14" in out


def test_cli_simulate_json_is_keyed_by_policy(tmp_path, capsys):
    path = write_trace(tmp_path, TEXTBOOK_TRACE)

    status = main(["sched", "simulate", str(path), "--policy", "hrrn", "--json"])

    data = json.loads(capsys.readouterr().out)
    assert status == 0
    assert list(data) == ["hrrn"]
    assert data["hrrn"]["mean_turnaround"] == 8.0
    assert data["hrrn"]["dropped"] == []
    first = data["hrrn"]["requests"][0]
    assert {"name", "start", "finish", "turnaround"} <= set(first)
    assert first["normalised_turnaround"] == 1.0


def test_cli_simulate_json_lists_every_policy_by_default(tmp_path, capsys):
    path = write_trace(tmp_path, TEXTBOOK_TRACE)

    main(["sched", "simulate", str(path), "--json"])

    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["fifo", "priority", "hrrn", "edf"]


def test_cli_bad_trace_exits_2_with_one_line_naming_the_line(tmp_path, capsys):
    path = write_trace(tmp_path, "name,arrival,duration\nA,0,3\nB,soon,6\n")

    status = main(["sched", "simulate", str(path)])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"llmasos: error: {path}:3: column 2 (arrival)")


@pytest.mark.parametrize(
    "argv",
    [
        ["sched", "simulate", "t.csv", "--policy", "lottery"],
        ["sched", "simulate"],
        ["sched"],
        [],
        ["nonsense"],
    ],
    ids=["bad-policy", "no-trace", "no-sched-command", "no-command", "unknown"],
)
def test_cli_usage_error_exits_2_with_one_line(argv, capsys):
    status = main(argv)

    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.count("\n") == 1
    assert "error:" in captured.err and "--help" in captured.err


@pytest.mark.parametrize(
    "argv", [[], ["sched"], ["sched", "simulate"]], ids=["top", "sched", "simulate"]
)
def test_cli_help_exits_0_on_every_command(argv, capsys):
    status = main([*argv, "--help"])

    assert status == 0
    assert "usage: llmasos" in capsys.readouterr().out


def test_cli_runs_as_a_module(tmp_path):
    path = write_trace(tmp_path, TEXTBOOK_TRACE)

    completed = subprocess.run(
        [sys.executable, "-m", "llmasos.cli", "sched", "simulate", str(path)]
        + ["--policy", "fifo"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
    )

    assert completed.returncode == 0
    assert completed.stdout == EXPECTED_FIFO_TABLE
