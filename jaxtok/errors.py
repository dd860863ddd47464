"""The one exception type that command-line entry points turn into a one-line message.

Library code raises `JaxtokError` for anything the user can fix (a missing file, a bad config value, a checkpoint
that is not a Llama). Scripts catch it, print its message and exit non-zero without a traceback. Bugs keep raising
ordinary exceptions, so they still show a traceback.
"""

import errno

# A disk that cannot take a write: the user's problem to fix (free space, permissions), not a bug to trace.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class JaxtokError(Exception):
    """A problem with the user's input; the message names the problem and, where possible, the fix."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint: `message` says where to resume, `code` is the exit
    status (128 + the signal's number, as a shell reports a process killed by it)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
