"""IO: ``runtimectl run``: run a command in the sandbox over a snapshot, for a platform.

The command's stdout and stderr stay its own (streamed live); ``runtimectl`` exits with the
command's exit status, or 128+n when a signal ended it. ``-v`` prints a one-line execution
report on stderr at the end; ``--report FILE`` (``-`` for stderr) writes the whole result as
JSON. The request goes to the daemon (``--socket``; ``--embedded`` starts one in this process
for the command, as root, with ``--state-dir`` and ``--binfmt-misc``), which streams the
output back; leaving early (Ctrl-C, or our stdout's reader gone) closes the connection, and
the daemon kills the command's whole tree.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

import trio

from runtimed.client import Client, ExecResult
from runtimed.commands.options import add_binfmt_misc_argument, add_state_dir_argument
from runtimed.errors import Json, RpcError, UsageError
from runtimed.session import add_session_arguments, run_session
from sandbox.spec import ExecSpec, parse_size


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``run`` to ``runtimectl``."""
    run = sub.add_parser(
        "run",
        help="run a command in a sandbox over a snapshot",
        description="Run CMD in a sandbox over snapshot ID for a platform (native or "
        "emulated, reported truthfully). Exits with CMD's status (128+n for signal n).",
    )
    run.add_argument("--snapshot", required=True, metavar="ID", help="the snapshot to run on")
    run.add_argument(
        "--platform",
        metavar="P",
        help="the platform to run for (default: the snapshot's; 'host': this host's native "
        "platform, e.g. to run a cross-compiler)",
    )
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    run.add_argument("-w", "--workdir", metavar="DIR", help="working directory (created)")
    run.add_argument("--user", metavar="U", help="uid[:gid] or a name from the rootfs")
    run.add_argument("--hostname", metavar="H")
    run.add_argument("--network", choices=["none", "host"], default="none")
    run.add_argument(
        "--mount", action="append", default=[], metavar="SRC:DST[:ro]", help="bind mount"
    )
    run.add_argument("--memory", metavar="M", help="memory limit, e.g. 512m")
    run.add_argument("--pids", type=int, metavar="N", help="maximum number of processes")
    run.add_argument("--cpus", type=float, metavar="N", help="CPU limit in cores")
    run.add_argument("--timeout", type=float, metavar="T", help="seconds before the run is killed")
    run.add_argument("--commit", action="store_true", help="keep the run's changes as a snapshot")
    run.add_argument(
        "--hermetic-emulation",
        action="store_true",
        help="register the QEMU handler only inside the sandbox's own user namespace (Linux "
        ">= 6.7); the host's binfmt_misc is left alone, but device nodes cannot be created",
    )
    run.add_argument("--report", metavar="FILE", help="write the result as JSON ('-': stderr)")
    run.add_argument(
        "-v",
        "--verbose",
        dest="run_verbose",
        action="count",
        default=0,
        help="print a one-line execution report on stderr",
    )
    add_state_dir_argument(run)
    add_binfmt_misc_argument(run)
    add_session_arguments(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    run.set_defaults(func=_run)


def request_from_args(args: argparse.Namespace) -> ExecSpec:
    """The exec request the flags describe (validated like an RPC request).

    Raises:
        UsageError: a malformed ``-e``, ``--mount`` or size.
        InvalidSpecError: a field the request validation refuses.
    """
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    env: dict[str, Json] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"-e {item!r}: expected K=V")
        env[key] = value
    mounts: list[Json] = []
    for item in args.mount:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise UsageError(f"--mount {item!r}: expected SRC:DST[:ro]")
        source = str(Path(parts[0]).absolute())
        readonly = len(parts) == 3 and parts[2] == "ro"
        mounts.append({"source": source, "destination": parts[1], "readonly": readonly})
    request: dict[str, Json] = {
        "snapshot": args.snapshot,
        "args": command,
        "env": env,
        "network": args.network,
        "mounts": mounts,
        "commit": args.commit,
        "hermetic": args.hermetic_emulation,
    }
    optional: dict[str, Json] = {
        "platform": args.platform,
        "cwd": args.workdir,
        "user": args.user,
        "hostname": args.hostname,
        "memory": None if args.memory is None else parse_size(args.memory, field="memory"),
        "pids": args.pids,
        "cpus": args.cpus,
        "timeout": args.timeout,
    }
    request.update({k: v for k, v in optional.items() if v is not None})
    return ExecSpec.from_json(request)


def _run(args: argparse.Namespace) -> int:
    spec = request_from_args(args).to_json()
    result = run_session(args, lambda client: _execute(client, spec))
    if result is None:
        # Our reader went away and the exec was cancelled, as a pipeline's SIGPIPE would.
        return 128 + signal.SIGPIPE
    if args.run_verbose or args.verbose:
        print(f"runtimectl: {summary(result)}", file=sys.stderr)
    if args.report is not None:
        text = json.dumps(result, indent=2)
        if args.report == "-":
            print(text, file=sys.stderr)
        else:
            Path(args.report).write_text(text + "\n")
    status = result.get("exit_code")
    if not isinstance(status, int) or isinstance(status, bool):
        raise RpcError("the daemon's exec result lacks a valid 'exit_code'")
    return status


def summary(result: dict[str, Json]) -> str:
    """One line from an exec result: how it ended, the execution report, CPU in all."""
    if result.get("timed_out"):
        ended = "timed out"
    elif result.get("cancelled"):
        ended = "cancelled"
    elif result.get("signal") is not None:
        ended = f"killed by signal {result['signal']}"
    else:
        ended = f"exit {result.get('exit_code')}"
    resources = result.get("resources")
    cpu = resources.get("cpu_seconds") if isinstance(resources, dict) else None
    used = f"; {cpu:.2f}s CPU in all" if isinstance(cpu, int | float) else ""
    return f"{ended}; {result.get('summary')}{used}"


def _relay(out: BinaryIO, data: bytes) -> bool:
    """Write a chunk through; False once the reader went away (``runtimectl run … | head``).

    The dead fd is then pointed at /dev/null so that nothing (not even the interpreter's
    flush at exit) writes to the broken pipe again (Python docs, "Note on SIGPIPE").
    """
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, out.fileno())
        os.close(null)
        return False
    return True


async def _execute(client: Client, spec: dict[str, Json]) -> dict[str, Json] | None:
    """Relay the output live; the final result, or None when a reader of ours went away
    (leaving the stream closes the connection: the daemon kills the command's tree)."""
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    async with client.open_exec(spec) as events:
        async for event in events:
            if isinstance(event, ExecResult):
                return event.result
            out = outputs.get(event.stream)
            if out is None:
                raise RpcError(f"the daemon sent output of an unknown stream {event.stream!r}")
            if not await trio.to_thread.run_sync(_relay, out, event.data):
                return None
    raise RpcError("Exec: the daemon ended without a result")
