"""Where a home's PostgreSQL cluster lives (data dir, socket dir, log), and how it is made and removed.

PostgreSQL refuses to run as root, so as root it runs as the `postgres` OS user, who must reach its data
dir. Rather than open a path for it through the home and every parent up to `/` (changing modes outside
our own tree), the cluster lives in a directory that user owns, in its own home directory (normally
/var/lib/postgresql, which it can reach already): `polycommit-<hash of our home>`, mode 0700, holding
`data/`, `run/` (the socket) and `postgres.log`. Not as root, the server runs as us and the cluster stays
in the home (`data/postgres`, `logs/postgres.log`, a socket dir in `run/`).

Where it is is written into the home's run state at start (`run/postgres.cluster`), so that `status`,
`stop` and `reset` find it from the home alone. A cluster an older polycommit made in the home is used
where it is while it runs, and moved into its new place at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polycommit.config import Settings
from polycommit.tooling.servers.private import PRIVATE_MODE, private_dir
from polycommit.tooling.servers.process import ServicesError, data_path, log_path, pid_alive, read_pid

SERVER_USER = "postgres"
STATE_FILE = "postgres.cluster"
SOCKET_PATH_LIMIT = 100  # Unix socket paths are limited to ~107 bytes


@dataclass(frozen=True)
class ClusterPaths:
    data: Path
    sockets: Path
    log: Path
    root: Path | None = None  # the server user's directory holding all three; None: they live in the home

    def to_json(self) -> dict[str, str | None]:
        return {"data": str(self.data), "sockets": str(self.sockets), "log": str(self.log), "root": _str(self.root)}

    @staticmethod
    def from_json(raw: dict[str, str | None]) -> ClusterPaths:
        root = raw.get("root")
        return ClusterPaths(Path(str(raw["data"])), Path(str(raw["sockets"])), Path(str(raw["log"])), _path(root))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _path(raw: str | None) -> Path | None:
    return None if raw is None else Path(raw)


def as_server_user() -> bool:
    """Whether the server runs as the postgres OS user (we are root) rather than as us."""
    return os.geteuid() == 0


def _digest(settings: Settings) -> str:
    return hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]


def _reachable_by(path: Path, uid: int) -> bool:
    """Whether `uid` (not root) can traverse every ancestor of `path` and `path` itself, as modes stand now."""
    for folder in [*reversed(path.parents), path]:
        try:
            st = folder.stat()
        except OSError:
            return False
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            return False
    return True


def _server_user_base() -> Path:
    """The postgres user's home directory when it can reach it (it normally can), else the temp dir."""
    entry = pwd.getpwnam(SERVER_USER)
    home = Path(entry.pw_dir)
    if home.is_dir() and home.stat().st_uid == entry.pw_uid and _reachable_by(home, entry.pw_uid):
        return home
    return Path(tempfile.gettempdir())


def in_home(settings: Settings) -> ClusterPaths:
    """The layout in the home (not root, and clusters made by older versions)."""
    preferred = settings.run_dir / "postgres"
    sockets = preferred
    if len(str(preferred / f".s.PGSQL.{settings.postgres.port}.lock")) > SOCKET_PATH_LIMIT:
        sockets = Path(tempfile.gettempdir()) / f"polycommit-pg-{_digest(settings)}"
    return ClusterPaths(data_path(settings, "postgres"), sockets, log_path(settings, "postgres"))


def owned_by_server(settings: Settings) -> ClusterPaths:
    root = _server_user_base() / f"polycommit-{_digest(settings)}"
    return ClusterPaths(root / "data", root / "run", root / "postgres.log", root)


def _state(settings: Settings) -> Path:
    return settings.run_dir / STATE_FILE


def recorded(settings: Settings) -> ClusterPaths | None:
    try:
        return ClusterPaths.from_json(json.loads(_state(settings).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _legacy_running(settings: Settings) -> bool:
    pid = read_pid(in_home(settings).data / "postmaster.pid")
    return pid is not None and pid_alive(pid)


def locate(settings: Settings) -> ClusterPaths:
    """This home's cluster: as recorded at its last start, else where a start would put it."""
    found = recorded(settings)
    if found is not None:
        return found
    if not as_server_user() or _legacy_running(settings):
        return in_home(settings)
    return owned_by_server(settings)


def _chown_to_server(path: Path) -> None:
    entry = pwd.getpwnam(SERVER_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _server_dir(path: Path) -> None:
    """A directory of the cluster root, owned by the server user, 0700. A symlink, a file, or a directory
    somebody else made (in the temp dir, say) is refused rather than adopted."""
    if not path.exists() and not path.is_symlink():
        path.mkdir(mode=PRIVATE_MODE)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, pwd.getpwnam(SERVER_USER).pw_uid):
        raise ServicesError(f"postgres: {path} is not a directory of polycommit's (a symlink, a file, or not ours)")
    _chown_to_server(path)
    path.chmod(PRIVATE_MODE)


def _adopt_legacy(settings: Settings, paths: ClusterPaths) -> None:
    """Move a stopped cluster an older polycommit made in the home into the server user's directory.

    Copied under another name first and renamed once complete, so a failure leaves the old one whole."""
    legacy = in_home(settings).data
    if paths.root is None or not (legacy / "PG_VERSION").exists() or (paths.data / "PG_VERSION").exists():
        return
    staging = paths.root / "data.moving"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(legacy, staging, symlinks=True)
    for folder, dirs, files in os.walk(staging):
        _chown_to_server(Path(folder))
        for name in (*dirs, *files):
            _chown_to_server(Path(folder) / name)
    staging.chmod(PRIVATE_MODE)
    if paths.data.exists():
        paths.data.rmdir()  # empty: it holds no PG_VERSION
    staging.rename(paths.data)
    shutil.rmtree(legacy)


def _prepare_owned(settings: Settings, paths: ClusterPaths) -> None:
    assert paths.root is not None
    _server_dir(paths.root)
    _adopt_legacy(settings, paths)
    for folder in (paths.data, paths.sockets):
        _server_dir(folder)
    paths.log.touch(exist_ok=True)
    _chown_to_server(paths.log)
    paths.log.chmod(0o600)


def _prepare_in_home(settings: Settings, paths: ClusterPaths) -> None:
    """The server runs as us: its folders are ours, private, in the home (the socket dir may be in /tmp)."""
    for folder in (paths.data, paths.sockets):
        private_dir(folder, settings.home if settings.home in folder.parents else folder)
    private_dir(paths.log.parent, settings.home if settings.home in paths.log.parents else paths.log.parent)
    paths.log.touch(exist_ok=True)


def prepare(settings: Settings) -> ClusterPaths:
    """Make the cluster's directories (0700; the server user's as root) and record where they are."""
    paths = locate(settings)
    if paths.root is None and as_server_user() and not _legacy_running(settings):
        paths = owned_by_server(settings)  # a cluster made in the home by an older version moves now
    if paths.root is not None:
        _prepare_owned(settings, paths)
    else:
        _prepare_in_home(settings, paths)
    private_dir(settings.run_dir, settings.home)
    _state(settings).write_text(json.dumps(paths.to_json()) + "\n")
    return paths


def remove(settings: Settings) -> None:
    """Delete the cluster's folders outside the home (the home's own folders are reset's to delete): only
    folders named as polycommit names them, never through a symlink."""
    candidates = {locate(settings), in_home(settings)}
    if as_server_user():
        candidates.add(owned_by_server(settings))
    for paths in candidates:
        for folder in (paths.root, paths.sockets):
            if folder is None or settings.home in folder.parents or not folder.name.startswith("polycommit-"):
                continue
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)
