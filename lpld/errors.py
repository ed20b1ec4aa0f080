"""The one exception type for problems with the user's input.

The CLI prints a ``UserError`` as a one-line message without a traceback, so its text must say
what is wrong and what to do about it.
"""


class UserError(Exception):
    """Bad input (a path, a file, a setting) that the user can fix; the message says how."""
