"""The agent's own folders and files: nothing another local user planted is trusted.

A spool, log or quarantine folder must be a real folder (not a symbolic
link), owned by the user the agent runs as, and not writable by group or
others. Anyone else who can write there could plant a record that the agent
uploads as a result, or a link that makes it append its log to, or upload,
a file of the agent user's. Files of ours are opened with ``O_NOFOLLOW``: a
symbolic link in their place fails (``ELOOP``) instead of being followed.

``default_base_dir`` is where the spool and logs live when no flag says: a
per-user folder that survives a reboot, never the shared temp folder.

For callers: ``default_base_dir``, ``legacy_base_dir``, ``own_folder``
(create or check, raising ``ConfigError``), ``folder_problem`` (the rule, pure),
``open_own`` (``os.open`` that never follows a link).
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Mapping, Optional

from .errors import ConfigError

#: not on Windows, which has no symbolic links in the POSIX sense here (0
#: there); every open of a file of the agent's (logs, spool) adds it
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def default_base_dir(env: Optional[Mapping[str, str]] = None, euid: Optional[int] = None) -> str:
    """The folder of the default spool and log folders.

    ``$XDG_STATE_HOME/acagent`` when that is set (an absolute path), else
    ``/var/lib/acagent`` for root and ``~/.local/state/acagent`` for anyone
    else (``%LOCALAPPDATA%\\acagent`` on Windows). Per user, so two users'
    agents never share a spool, and outside the temp folder, which many
    systems empty at boot.
    """
    env = os.environ if env is None else env
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "acagent")
    if os.name == "nt":
        local = env.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return os.path.join(local, "acagent")
    if (os.geteuid() if euid is None else euid) == 0:
        return "/var/lib/acagent"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "acagent")


def legacy_base_dir() -> str:
    """Where earlier versions kept the spool and logs by default: ``<tmp>/armorcode``."""
    return os.path.join(tempfile.gettempdir(), "armorcode")


def folder_problem(st: os.stat_result, euid: Optional[int]) -> Optional[str]:
    """Why a folder with this ``lstat`` is not the agent's own, or None.

    ``euid`` None: no owner to compare (Windows).
    """
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; give the real folder"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if euid is not None and st.st_uid != euid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid}); use one of its own"
    if euid is not None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        return f"is writable by group or others (mode {mode:04o}); chmod go-w it, or use another"
    return None


def own_folder(field: str, path: str, *, create: bool = True) -> None:
    """Make sure ``path`` is a folder of the agent's own (see the module doc).

    Missing: created 0700 (``create``), or left alone. ``field`` names the
    setting in the ``ConfigError`` raised for a folder that is not ours.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(field, f"cannot create folder {path}: {reason}") from None
    except OSError as exc:
        raise ConfigError(field, f"cannot look at {path}: {exc.strerror or exc}") from None
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    problem = folder_problem(st, euid)
    if problem is not None:
        raise ConfigError(field, f"{path} {problem}")


def open_own(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a file of ours: a symbolic link in its place raises ``OSError`` (ELOOP)."""
    return os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)
