"""A model file this process may not read is named with the user, not reported as missing."""

from __future__ import annotations

import os
from pathlib import Path


def check_readable(path: Path) -> None:
    """PermissionError naming the file, the user and the mode, when `path` cannot be read
    (safetensors says "No such file or directory" for a file it may not open)."""
    if os.access(path, os.R_OK):
        return
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        user = "?"
    st = path.stat()
    raise PermissionError(f"{path}: not readable by user {user} (uid {os.geteuid()}): mode "
                          f"{st.st_mode & 0o777:o}, owner uid {st.st_uid}; make the model's "
                          "files readable (chmod a+r) or run as their owner")
