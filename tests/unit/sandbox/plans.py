"""A plan built the way the launcher builds one, for the plan and wire tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from runtimed.errors import Json
from sandbox.plan import Plan, build_plan
from sandbox.spec import ExecSpec, Identity

IDENTITY = Identity(uid=1000, gid=1000, groups=(10,))


def sample_plan(
    *,
    argv: Sequence[str] = ("sh",),
    env: Mapping[str, str] | None = None,
    identity: Identity = IDENTITY,
    **request: Json,
) -> Plan:
    """The plan of an exec request (``request`` merged over a snapshot reference) over two
    layers, as user ``identity``."""
    return build_plan(
        spec=ExecSpec.from_json({"snapshot": "s", **request}),
        layers=["/store/l1", "/store/l2"],
        run_dir="/store/runs/r1",
        argv=argv,
        env=env if env is not None else {"PATH": "/bin"},
        identity=identity,
        resolv_conf="nameserver 10.0.0.1\n",
        cgroups=["/sys/fs/cgroup/pids/runtimed/r1"],
        cgroup_namespace=False,
    )
