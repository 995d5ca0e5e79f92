"""The io.runtimed interface file and the error <-> error reply mapping (pure)."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import varlink

from runtimed.errors import (
    DaemonUnavailableError,
    InternalError,
    InvalidParamsError,
    KernelError,
    MethodNotFoundError,
    NoEmulatorError,
    RpcError,
    RuntimedError,
    all_error_classes,
)
from runtimed.interface import (
    MAX_SOURCE_NAME,
    SERVICE_DESCRIPTION,
    error_from_reply,
    error_reply,
    is_source_name,
)

DESCRIPTION = resources.files("runtimed").joinpath("io.runtimed.varlink").read_text()
# Raised only on the client side (the daemon is unreachable) or standard-mapped: never sent
# as io.runtimed.<Name>.
NEVER_SENT = {DaemonUnavailableError, InvalidParamsError, MethodNotFoundError}


def declared(keyword: str) -> set[str]:
    """The names the description declares with ``keyword`` (method, error, type)."""
    return set(re.findall(rf"^{keyword}\s+([A-Za-z][\w.-]*)", DESCRIPTION, re.MULTILINE))


def test_protocol_interface_file_parses_with_the_reference_implementation() -> None:
    interface = varlink.Interface(DESCRIPTION)
    assert interface.name == "io.runtimed"
    assert varlink.Interface(SERVICE_DESCRIPTION).name == "org.varlink.service"


def test_protocol_interface_declares_every_error_the_daemon_can_send() -> None:
    declared_errors = declared("error")
    sendable = {
        cls.varlink_name().rpartition(".")[2]
        for cls in all_error_classes()
        if ("code" in vars(cls) or cls is InternalError) and cls not in NEVER_SENT
    }
    assert sendable - declared_errors == set()


def test_protocol_interface_declares_methods_and_types() -> None:
    assert {"GetPlatforms", "Exec", "ImportSnapshot"} <= declared("method")
    assert "Stream" in declared("type")


def test_protocol_interface_import_source_is_optional() -> None:
    found = re.search(r"^method ImportSnapshot\(([^)]*)\)", DESCRIPTION, re.MULTILINE)
    assert found is not None
    parameters = [p.strip() for p in found.group(1).split(",")]
    assert parameters == ["fileDescriptor: int", "platform: ?string", "source: ?string"]
    assert f"at most {MAX_SOURCE_NAME} characters" in DESCRIPTION


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("/home/me/rootfs", True),
        ("build step 3: café", True),
        ("x" * MAX_SOURCE_NAME, True),
        ("", False),
        ("x" * (MAX_SOURCE_NAME + 1), False),
        ("a\nforged line", False),
        ("tab\there", False),
        ("esc\x1b[2J", False),
        ("nul\x00", False),
    ],
)
def test_protocol_interface_source_name(text: str, valid: bool) -> None:
    assert is_source_name(text) is valid


@pytest.mark.parametrize(
    "exc",
    [
        NoEmulatorError("no emulator for linux/riscv64", details={"platform": "linux/riscv64"}),
        InvalidParamsError("bad argv", details={"parameter": "spec.argv"}, hint="a list"),
        MethodNotFoundError("no such method", details={"method": "io.runtimed.Nope"}),
        KernelError("mount /x: EPERM", syscall="mount", errno_name="EPERM", path="/x"),
        RpcError("broken"),
    ],
)
def test_protocol_error_reply_round_trips(exc: RuntimedError) -> None:
    name, parameters = error_reply(exc)
    back = error_from_reply(name, parameters)
    assert type(back) is type(exc)
    assert (back.message, back.details, back.hint) == (exc.message, exc.details, exc.hint)


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (
            InvalidParamsError("x", details={"parameter": "id"}),
            "org.varlink.service.InvalidParameter",
        ),
        (MethodNotFoundError("x", details={"method": "a.B"}), "org.varlink.service.MethodNotFound"),
        (NoEmulatorError("x"), "io.runtimed.NoEmulator"),
    ],
)
def test_protocol_error_reply_names(exc: RuntimedError, name: str) -> None:
    assert error_reply(exc)[0] == name


def test_protocol_internal_error_sends_only_the_request_id() -> None:
    name, parameters = error_reply(
        InternalError("secret /etc/shadow", details={"x": 1}), request_id="r7"
    )
    assert name == "io.runtimed.Internal"
    assert "secret" not in str(parameters)
    assert parameters["request"] == "r7"
    assert isinstance(error_from_reply(name, parameters), InternalError)


def test_protocol_unknown_error_name_is_an_rpc_error() -> None:
    back = error_from_reply("com.example.Weird", {"message": "?"})
    assert type(back) is RpcError
    assert "com.example.Weird" in back.message


def test_protocol_standard_invalid_parameter_without_message_names_the_parameter() -> None:
    back = error_from_reply("org.varlink.service.InvalidParameter", {"parameter": "spec"})
    assert isinstance(back, InvalidParamsError)
    assert "spec" in back.message
