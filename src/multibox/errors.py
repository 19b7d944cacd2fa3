"""The typed errors that the command line reports in one line (``error: <message>``, exit status 2).

Every error a user can cause by their input or environment (a bad config, a corrupt checkpoint or dataset, a
missing file) derives from :class:`MultiboxError`, so that ``multibox.cli`` catches one class and library callers
may catch it too. This module imports nothing, so that any layer can use it.
"""
from __future__ import annotations

__all__ = ["InputError", "MultiboxError"]


class MultiboxError(Exception):
    """A failure caused by the user's input or environment, reported by the CLI in one line."""


class InputError(MultiboxError, ValueError):
    """An argument that cannot be used: a missing input file, an unknown class or benchmark line."""
