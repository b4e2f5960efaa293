"""The `llmasos` command line.

Each subsystem adds one group of subcommands in its own `_add_<group>`
function, called from `_build_parser`; each subcommand names its handler
with `set_defaults(run=...)`. A handler takes the parsed arguments, writes
its output to stdout and returns the exit status.

Exit status: 0 on success, 2 on a usage error or bad input (one line on
stderr), 1 on any other LLMasOS failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TypeAlias

from llmasos.commands import UsageError, add_commands
from llmasos.errors import LLMasOSError
from llmasos.manifest import ManifestError
from llmasos.sched.policies import POLICY_NAMES, UnknownPolicyError
from llmasos.sched.simulate import (
    TraceError,
    format_results,
    load_trace,
    results_to_json,
    simulate,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Failures caused by what the user typed or supplied, reported as usage errors.
_BAD_INPUT = (TraceError, UnknownPolicyError, ManifestError, UsageError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors fit on one line of stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# What `add_subparsers` returns; each `_add_<group>` adds its group to it.
_Groups: TypeAlias = "argparse._SubParsersAction[_Parser]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `llmasos` command with `argv` (default: sys.argv[1:])."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_status(exc)

    try:
        status: int = args.run(args)
    except BrokenPipeError:
        # the reader of our output went away (``llmasos ps | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except _BAD_INPUT as exc:
        return _fail(EXIT_USAGE, exc)
    except LLMasOSError as exc:
        return _fail(EXIT_FAILURE, exc)
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmasos",
        description="LLMasOS, a user-space microkernel for microservices.",
    )
    groups = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_commands(groups)
    _add_sched(groups)
    return parser


def _add_sched(groups: _Groups) -> None:
    """Add `llmasos sched ...`: scheduling policies and their simulator."""
    sched = groups.add_parser(
        "sched",
        help="scheduling policies and their simulator",
        description="Scheduling policies of the run queues, and their simulator.",
    )
    commands = sched.add_subparsers(title="commands", metavar="COMMAND", required=True)

    simulate_cmd = commands.add_parser(
        "simulate",
        help="replay a trace of requests under one or all policies",
        description=(
            "Replay a CSV trace on one non-preemptive worker in virtual time and "
            "print each request's start, finish, turnaround and normalised "
            "turnaround (turnaround / duration), with the means."
        ),
        epilog=(
            "The trace has a header row; columns name, arrival and duration are "
            "required, priority and deadline (an absolute time) optional."
        ),
    )
    simulate_cmd.add_argument("trace", metavar="TRACE", help="the trace, a CSV file")
    simulate_cmd.add_argument(
        "--policy",
        choices=(*POLICY_NAMES, "all"),
        default="all",
        help="the policy to simulate, or all side by side (default: all)",
    )
    simulate_cmd.add_argument(
        "--json", action="store_true", help="print the results as JSON"
    )
    simulate_cmd.set_defaults(run=_run_sched_simulate)


def _run_sched_simulate(args: argparse.Namespace) -> int:
    """Handle `llmasos sched simulate`."""
    requests = load_trace(args.trace)
    names = POLICY_NAMES if args.policy == "all" else (args.policy,)
    results = [simulate(requests, name) for name in names]

    render = results_to_json if args.json else format_results
    print(render(results))
    return EXIT_OK


def _exit_status(exc: SystemExit) -> int:
    """Return the status argparse asked for when it exited (--help, errors)."""
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return EXIT_USAGE


def _fail(status: int, exc: Exception) -> int:
    print(f"llmasos: error: {exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
