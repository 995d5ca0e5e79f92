"""Plans: op order, redundant binds, overlay options and descriptions."""

from __future__ import annotations

import pytest

from runtimed.errors import SandboxError
from sandbox.plan import (
    BindMount,
    MaskPath,
    Op,
    OverlayMount,
    ProcMount,
    TmpfsMount,
    build_plan,
    optimize,
)
from sandbox.spec import ExecSpec, Identity
from tests.unit.sandbox.plans import sample_plan

_plan = sample_plan


def test_plan_overlay_lists_top_layer_first_with_explicit_options() -> None:
    root = OverlayMount(layers=("/l/bottom", "/l/top"), upper="/r/upper", work="/r/work")
    assert root.options() == (
        "lowerdir=/l/top:/l/bottom,upperdir=/r/upper,workdir=/r/work,"
        "userxattr,index=off,metacopy=off,volatile"
    )


def test_plan_ops_sorted_by_depth_parents_first() -> None:
    plan = _plan(mounts=[{"source": "/src", "destination": "/dev/x/y"}])
    depths = [op.destination.count("/") for op in plan.ops]
    assert depths == sorted(depths)
    destinations = [op.destination for op in plan.ops]
    assert destinations.index("/proc") < destinations.index("/proc/kcore")
    assert destinations.index("/dev") < destinations.index("/dev/null")


@pytest.mark.parametrize(
    ("ops", "kept"),
    [
        # hidden by a later mount on the same destination
        (
            [BindMount(source="/a", destination="/x"), TmpfsMount(destination="/x")],
            [TmpfsMount(destination="/x")],
        ),
        # covered by a parent bind of the same subtree
        (
            [
                BindMount(source="/a", destination="/x"),
                BindMount(source="/a/b", destination="/x/b"),
            ],
            [BindMount(source="/a", destination="/x")],
        ),
        # a different source or read-only flag is not redundant
        (
            [
                BindMount(source="/a", destination="/x"),
                BindMount(source="/a/b", destination="/x/b", readonly=True),
                BindMount(source="/c", destination="/x/c"),
            ],
            [
                BindMount(source="/a", destination="/x"),
                BindMount(source="/a/b", destination="/x/b", readonly=True),
                BindMount(source="/c", destination="/x/c"),
            ],
        ),
        # stable among equal depths, deeper after shallower
        (
            [MaskPath(destination="/proc/kcore"), ProcMount(), TmpfsMount(destination="/tmp")],
            [ProcMount(), TmpfsMount(destination="/tmp"), MaskPath(destination="/proc/kcore")],
        ),
    ],
)
def test_plan_optimize(ops: list[Op], kept: list[Op]) -> None:
    assert optimize(ops) == kept


def test_plan_network_none_adds_net_namespace_and_loopback() -> None:
    assert "net" in _plan().namespaces
    assert _plan().loopback
    assert "net" not in _plan(network="host").namespaces


def test_plan_describes_every_step_in_order() -> None:
    plan = _plan(mounts=[{"source": "/src", "destination": "/src", "readonly": True}])
    lines = plan.describe()
    assert lines[0].startswith("overlay root: 2 layer(s)")
    assert lines[1:] == [op.describe() for op in plan.ops]
    assert "bind /src on /src (ro)" in lines


def test_plan_refuses_layer_paths_overlay_cannot_express() -> None:
    spec = ExecSpec.from_json({"snapshot": "s"})
    with pytest.raises(SandboxError, match="overlay"):
        build_plan(
            spec=spec,
            layers=["/a:b"],
            run_dir="/r",
            argv=["sh"],
            env={},
            identity=Identity(uid=0, gid=0),
            resolv_conf="",
            cgroups=[],
            cgroup_namespace=False,
        )
