"""The one exception of bnlab.datasets, and the fix its messages share."""

from __future__ import annotations

__all__ = ["REPLACE_HINT", "DatasetError"]

# Every message about a bad file ends with what to do about it: the user can rarely repair a dataset file by hand.
REPLACE_HINT = "delete it so that it is downloaded again, or replace it with the official file"


class DatasetError(ValueError):
    """A dataset file is missing, damaged, or not the expected one. The message names the file and the fix.

    A subclass of ValueError so that code catching bad-input errors catches it too.
    """
