"""How a save becomes visible all at once (Orbax's ``ocp.path.atomicity``).

Orbax lets ``CheckpointManagerOptions(temporary_path_class=...)`` choose between writing into
a temporary directory renamed at the commit (:class:`AtomicRenameTemporaryPath`, the default
on local filesystems) and writing in place with a ``commit_success.txt`` marker written last
(:class:`CommitFileTemporaryPath`, for object stores, where renaming a prefix means copying
it). ckpt_async picks between the two by where the checkpoint goes (a rename on a local
filesystem, the marker on an object store), so both names are accepted as
``temporary_path_class`` values and change nothing; each library reads either layout.
"""

from __future__ import annotations

from .. import _format as fmt

#: The marker a save written in place writes last (object stores).
COMMIT_SUCCESS_FILE = fmt.COMMIT_SUCCESS
#: The suffix of a save's temporary directory (``<step>.orbax-checkpoint-tmp-<ns>``).
TMP_DIR_SUFFIX = fmt.TMP_SUFFIX


class AtomicRenameTemporaryPath:
    """Written into a temporary directory, renamed at the commit (local filesystems)."""


class CommitFileTemporaryPath:
    """Written in place, visible once ``commit_success.txt`` is written (object stores)."""


__all__ = ["COMMIT_SUCCESS_FILE", "TMP_DIR_SUFFIX", "AtomicRenameTemporaryPath",
           "CommitFileTemporaryPath"]
