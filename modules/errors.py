"""The project's error for bad input: a file, a flag or a setting the user can fix.

Entry scripts catch it at the top, print its message as one line (it names the file or flag and what to do) and
exit with code 2; the traceback goes to log.txt. Anything else is a bug or an environment failure and keeps its
traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input; the message names the file or flag and says what to do."""


class ModelConfigError(InputError, ValueError):
    """T2VLP settings (split_layer, tube_layers, fusion_layers, ...) that the given CLIP cannot take; named as the
    entry scripts' flags are, so it reaches the user as one line."""
