"""The project's error base class.

Every error that reports a problem with the user's input or environment (a checksum mismatch, an unsafe
pickle, malformed annotations, a count mismatch, a config typo, a bad checkpoint) derives from
`RemamberError`, so the `remamber` command can print its message as one line instead of a traceback. Each
subclass also keeps its historical builtin base (ValueError, RuntimeError, ...) so existing `except`
clauses still catch it. This module imports nothing heavy (no torch): the CLI imports it at start.
"""

from __future__ import annotations


class RemamberError(Exception):
    """A user-facing error whose message names the file, key or value at fault and what to do."""
