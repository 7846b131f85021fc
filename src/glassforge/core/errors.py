"""One exception type for mistakes a user can fix.

The CLI turns a `UserError` into a one-line message on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, field or value that names the problem."""
