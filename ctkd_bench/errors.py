"""User-facing errors: one clear line, exit code 2, no traceback (the CLI catches these)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (flags, files, names). The message names the bad input and the fix."""

    exit_code = 2
