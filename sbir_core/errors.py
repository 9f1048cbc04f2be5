"""The errors sbir_core raises on purpose. Each message is one plain-text sentence a
person can act on; the command line prints it as one line (exit code 2) and the app
shows it in the page. Anything else is a bug and keeps its traceback."""
from __future__ import annotations


class SBIRError(Exception):
    """Base of every error sbir_core raises on purpose."""


class InputError(SBIRError, ValueError):
    """Input a caller can fix: an empty drawing, an unreadable or oversized image, a
    malformed stroke list, an unknown name. (Also a ValueError: it is one.)"""
