"""The one exception type for mistakes a user can fix (a recipe, an override, a file, the data).

``domainclip`` prints such an error as one line on stderr and exits with code 2, without a
traceback; anything else is a bug in the kit and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the file / key / value and what to do."""
