"""Errors raised by ckv clients.  Every one derives from L{CkvError}."""

from __future__ import annotations


class CkvError(Exception):
    """Base class of every ckv error."""


class Unavailable(CkvError):
    """
    No answer arrived in time.  The outcome of the request is unknown: an
    update may or may not have been applied.
    """


class RequestError(CkvError):
    """The store refused the request (bad input, a limit exceeded...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TooLarge(RequestError):
    """A key or value exceeds its limit (see L{ckv.wire.MAX_KEY}, L{ckv.wire.MAX_VALUE})."""


class ProtocolError(CkvError):
    """The peer sent something this client cannot understand."""
