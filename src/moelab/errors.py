"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class MoelabError(Exception):
    """Bad input or an unsupported case, with a message that names what was wrong and what was expected."""


class UnsupportedModelError(MoelabError):
    """The model's architecture has no adapter in ``moelab.models``."""


class CheckpointError(MoelabError):
    """A checkpoint directory is missing, unsafe (pickle) or inconsistent."""


class TraceError(MoelabError):
    """A routing trace is corrupt, incomplete or does not match the model it is used with."""
