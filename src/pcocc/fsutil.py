"""Small file-system helpers with the checks that shared directories like /tmp need."""

import os
import stat

from pcocc.errors import PermissionDenied


def private_dir(path):
    """Create path (mode 0700) if needed and make sure it is ours: a real directory owned by us.

    In /tmp another user could have made it first, or put a link there.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise PermissionDenied(f"cannot create {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionDenied(f"{path} is not a directory of yours: remove it, or set PCOCC_RUN_DIR")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
