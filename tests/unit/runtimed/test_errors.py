from __future__ import annotations

import pytest

from runtimed.errors import (
    InternalError,
    InvalidArchiveError,
    Json,
    KernelError,
    NoEmulatorError,
    RuntimedError,
    all_error_classes,
    error_class_for_code,
    error_from_json,
    leaf_exceptions,
    sole_exception,
)


def test_errors_codes_are_unique_per_class() -> None:
    owners: dict[str, type[RuntimedError]] = {}
    for cls in all_error_classes():
        if "code" not in vars(cls):
            continue
        assert cls.code not in owners, f"{cls.__name__} reuses {owners[cls.code].__name__}'s code"
        owners[cls.code] = cls


def test_errors_varlink_names_are_unique() -> None:
    names = [cls.varlink_name() for cls in all_error_classes() if "code" in vars(cls)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("cls", all_error_classes())
def test_errors_every_class_has_a_dotted_code_and_error_suffix(cls: type[RuntimedError]) -> None:
    area, _, name = cls.code.partition(".")
    assert area
    assert name
    assert name[0].isupper()
    assert cls.__name__.endswith("Error")


@pytest.mark.parametrize("cls", all_error_classes())
def test_errors_code_maps_back_to_its_class(cls: type[RuntimedError]) -> None:
    owns_code = "code" in vars(cls) and cls is not RuntimedError
    expected = cls if owns_code else InternalError
    assert error_class_for_code(cls.code) is expected


def test_errors_unknown_code_is_internal() -> None:
    assert error_class_for_code("nope.Nope") is InternalError


def test_errors_kernel_error_carries_errno_by_name() -> None:
    exc = KernelError("mount overlay on /x: EPERM", syscall="mount", errno_name="EPERM", path="/x")
    assert exc.to_json()["details"] == {"syscall": "mount", "errno": "EPERM", "path": "/x"}


@pytest.mark.parametrize(
    "error",
    [
        KernelError(
            "mount overlay on /x: EPERM",
            syscall="mount",
            errno_name="EPERM",
            path="/x",
            flags="MS_RDONLY",
            details={"extra": 1},
            hint="run as root",
        ),
        InvalidArchiveError("layer 2: truncated gzip", details={"entry": "etc/passwd"}),
        NoEmulatorError("no handler for linux/arm64", hint="runtimectl binfmt install arm64"),
    ],
)
def test_errors_json_record_rebuilds_the_same_error(error: RuntimedError) -> None:
    rebuilt = error_from_json(error.to_json(), fallback="helper failed")
    assert type(rebuilt) is type(error)
    assert rebuilt.to_json() == error.to_json()


@pytest.mark.parametrize("record", [None, "boom", [1, 2], 3])
def test_errors_malformed_record_is_internal(record: Json) -> None:
    rebuilt = error_from_json(record, fallback="helper failed")
    assert type(rebuilt) is InternalError
    assert rebuilt.message.startswith("helper failed: malformed error record")


def test_errors_record_without_code_or_message_is_internal_with_fallback() -> None:
    rebuilt = error_from_json({"details": {"x": 1}}, fallback="helper failed")
    assert type(rebuilt) is InternalError
    assert rebuilt.message == "helper failed"


def test_errors_leaf_exceptions_flattens_nested_groups_in_order() -> None:
    a, b, c = ValueError("a"), KeyError("b"), InvalidArchiveError("c")
    group = BaseExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("x", [c])])])
    assert leaf_exceptions(group) == [a, b, c]


def test_errors_sole_exception_unwraps_one_leaf_keeps_a_group_of_more() -> None:
    a, b = ValueError("a"), KeyError("b")
    assert sole_exception(ExceptionGroup("outer", [ExceptionGroup("inner", [a])])) is a
    group = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b])])
    assert sole_exception(group) is group
