"""Pure. Varlink interface descriptions and the mapping between our errors and error replies.

The ``io.runtimed`` description is the file ``runtimed/io.runtimed.varlink`` (read by the IO
layer and passed in here as text); ``org.varlink.service`` is the standard interface every
varlink service implements (https://varlink.org/Service). Errors cross the wire once, through
:func:`error_reply` on the daemon's side and :func:`error_from_reply` on the client's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from runtimed.errors import (
    VARLINK_INTERFACE,
    InternalError,
    InvalidParamsError,
    Json,
    MethodNotFoundError,
    RpcError,
    RuntimedError,
    all_error_classes,
)

SERVICE_INTERFACE: Final = "org.varlink.service"
SERVICE_INVALID_PARAMETER: Final = f"{SERVICE_INTERFACE}.InvalidParameter"
SERVICE_METHOD_NOT_FOUND: Final = f"{SERVICE_INTERFACE}.MethodNotFound"
SERVICE_INTERFACE_NOT_FOUND: Final = f"{SERVICE_INTERFACE}.InterfaceNotFound"
SERVICE_METHOD_NOT_IMPLEMENTED: Final = f"{SERVICE_INTERFACE}.MethodNotImplemented"
# ImportSnapshot's source: a label the daemon records and shows, never a path it opens.
MAX_SOURCE_NAME: Final = 4096

SERVICE_DESCRIPTION: Final = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)
"""


def is_source_name(text: str) -> bool:
    """Whether ``text`` may be sent as ImportSnapshot's ``source``: non-empty, printable (no
    control characters that could forge lines in a listing or a log) and bounded."""
    return 0 < len(text) <= MAX_SOURCE_NAME and text.isprintable()


def error_reply(
    exc: RuntimedError, *, request_id: str | None = None
) -> tuple[str, dict[str, Json]]:
    """The varlink error name and parameters that carry ``exc`` to the client.

    Invalid parameters and unknown methods use the standard ``org.varlink.service`` errors;
    every other error is ``io.runtimed.<Name>`` with its details, message and hint as
    parameters. An internal error carries only the request id its traceback is logged under.
    """
    parameters: dict[str, Json] = dict(exc.details)
    if isinstance(exc, InvalidParamsError) and isinstance(exc.details.get("parameter"), str):
        name = SERVICE_INVALID_PARAMETER
    elif isinstance(exc, MethodNotFoundError) and isinstance(exc.details.get("interface"), str):
        name = SERVICE_INTERFACE_NOT_FOUND
    elif isinstance(exc, MethodNotFoundError) and isinstance(exc.details.get("method"), str):
        name = SERVICE_METHOD_NOT_FOUND
    else:
        name = exc.varlink_name()
    if type(exc) in (InternalError, RuntimedError):
        parameters = {"message": "internal error, see the daemon's log"}
        if request_id is not None:
            parameters["request"] = request_id
        return name, parameters
    parameters["message"] = exc.message
    if exc.hint is not None:
        parameters["hint"] = exc.hint
    return name, parameters


def error_from_reply(name: str, parameters: Mapping[str, Json]) -> RuntimedError:
    """The exception of our hierarchy that an error reply stands for (client side)."""
    details = {k: v for k, v in parameters.items() if k not in ("message", "hint")}
    message = parameters.get("message")
    hint = parameters.get("hint")
    text = message if isinstance(message, str) else name
    hint_text = hint if isinstance(hint, str) else None
    if name == SERVICE_INVALID_PARAMETER:
        if not isinstance(message, str):
            text = f"invalid parameter {details.get('parameter')!r}"
        return InvalidParamsError(text, details=details, hint=hint_text)
    if name in (
        SERVICE_METHOD_NOT_FOUND,
        SERVICE_INTERFACE_NOT_FOUND,
        SERVICE_METHOD_NOT_IMPLEMENTED,
    ):
        return MethodNotFoundError(text, details=details, hint=hint_text)
    cls = _class_for_name(name)
    if cls is None:
        return RpcError(f"daemon replied with unknown error {name}", details=details)
    return cls.rebuild(text, details, hint_text)


def _class_for_name(name: str) -> type[RuntimedError] | None:
    interface, _, member = name.rpartition(".")
    if interface != VARLINK_INTERFACE:
        return None
    for cls in all_error_classes()[1:]:
        if "code" in vars(cls) and cls.varlink_name() == name:
            return cls
    return InternalError if member == InternalError.varlink_name().rpartition(".")[2] else None
