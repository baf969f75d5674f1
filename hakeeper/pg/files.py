"""The files the agent owns inside a PostgreSQL data directory, rewritten by
:meth:`hakeeper.pg.postgres.Postgres.write_config` before every start and after every clone or
rewind (both copy the source's files):

* ``postgresql.conf``  - all parameters, agent-owned ones last;
* ``pg_hba.conf`` and ``pg_ident.conf`` (the superuser's peer map);
* ``standby.signal``   - present iff the role is replica;
* ``postgresql.auto.conf`` - kept, minus any line setting an agent-owned parameter.

The replication password for ``primary_conninfo`` is not in the data directory: every base
backup and clone copies the data directory, so it lives in the node's runtime directory next to
it (``.<data dir name>.hakeeper/hakeeper.pgpass``, mode 0600, owned by PostgreSQL's OS user).
A ``hakeeper.pgpass`` an older version left in the data directory is removed on every write.

With ``postgresql.tls`` the certificate, key and CA files are copied into the same runtime
directory (``tls-server.crt``, ``tls-server.key``, ``tls-ca.crt``, mode 0600, owned by
PostgreSQL's OS user) before every start, clone and rewind: PostgreSQL refuses a key another
user may read, and as root the agent may read a key the PostgreSQL user cannot.  The server's
``ssl_*_file`` parameters and the tools' ``sslrootcert`` point at these copies.

Also here: the stale ``postmaster.pid`` clean-up and the tail of the server log.  Every function
takes the paths it works on; the names inside the data directory are decided by ``Postgres``.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hakeeper.core.config import (
    AGENT_OWNED_PARAMETERS,
    AGENT_SET_PARAMETERS,
    SOCKET_DIRS_PARAMETER,
    ParamValue,
    PostgresTls,
)
from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.pg.conf import build_conninfo, clean_auto_conf, render_postgresql_conf
from hakeeper.util.fsutil import ensure_dir, fsync_dir, write_atomic
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, postmaster_pid

# The logger every part of local PostgreSQL control logs under (unchanged by the module split).
log = get_logger("hakeeper.pg.postgres")

# sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107
PGPASS_NAME = "hakeeper.pgpass"
TLS_CERT_NAME = "tls-server.crt"
TLS_KEY_NAME = "tls-server.key"
TLS_CA_NAME = "tls-ca.crt"


@dataclass(frozen=True, slots=True)
class TlsPaths:
    """Where PostgreSQL and its tools find the agent's copies of the TLS files."""

    certfile: Path
    keyfile: Path
    cafile: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsPaths:
        return cls(directory / TLS_CERT_NAME, directory / TLS_KEY_NAME, directory / TLS_CA_NAME)


_PEM_CERT = "-----BEGIN CERTIFICATE-----"
_PEM_KEY_END = "PRIVATE KEY-----"


def tls_file_errors(tls: PostgresTls) -> list[tuple[str, str]]:
    """Problems with the files of ``postgresql.tls``, as (field, message): each must be a
    readable PEM file, the key unencrypted and not accessible to group or others (PostgreSQL
    itself refuses such a key; a key others can read is no secret)."""
    errors: list[tuple[str, str]] = []
    for field, path in (("certfile", tls.certfile), ("keyfile", tls.keyfile), ("cafile", tls.cafile)):
        name = f"postgresql.tls.{field}"
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                errors.append((name, f"{path} is not a regular file"))
                continue
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError as e:
            errors.append((name, f"cannot read {path}: {e.strerror or e}"))
            continue
        if field == "keyfile":
            if st.st_mode & 0o077:
                errors.append(
                    (
                        name,
                        f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may access "
                        "the private key (chmod 600 it)",
                    )
                )
            if _PEM_KEY_END not in text:
                errors.append((name, f"{path} holds no PEM private key"))
            elif "ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text:
                errors.append((name, f"{path} is encrypted: PostgreSQL would ask for a passphrase"))
        elif _PEM_CERT not in text:
            errors.append((name, f"{path} holds no PEM certificate"))
    return errors


def install_tls_files(tls: PostgresTls, dest: TlsPaths, run_as: RunAs) -> None:
    """Copy the configured TLS files to ``dest`` (0600, owned by ``run_as``; the directory is
    created 0700 if missing).  Read by the agent, which may be root, written for PostgreSQL."""
    pairs = ((tls.certfile, dest.certfile), (tls.keyfile, dest.keyfile), (tls.cafile, dest.cafile))
    texts = [(src.read_text(encoding="ascii"), target) for src, target in pairs]
    if not dest.certfile.parent.is_dir():
        mkdir_owned(dest.certfile.parent, run_as)
    for text, target in texts:
        write_atomic(target, text, mode=0o600, run_as=run_as)


def runtime_dir_for(data_dir: Path) -> Path:
    """The node's runtime directory, beside (never inside) its data directory: the agent lock,
    the fencer's state and the replication passfile."""
    return data_dir.parent / f".{data_dir.name}.hakeeper"


def remove_file(path: Path) -> bool:
    """Unlink ``path``; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def mkdir_owned(path: Path, run_as: RunAs) -> None:
    """A 0700 directory owned by PostgreSQL's OS user (created if missing).  A symbolic link at
    ``path`` (``ln -s /etc $PGDATA/log``) is refused: mode and owner are set on a descriptor
    opened without following it."""
    ensure_dir(path, mode=0o700, owner=run_as)


def remove_stale_pidfile(data_dir: Path, socket_dir: Path) -> None:
    """Drop postmaster.pid (and the socket lock files) when their postmaster is gone.
    PostgreSQL itself only asks kill(pid, 0), which succeeds for an unreaped zombie (a killed
    postmaster whose parent is a non-reaping init) or a reused PID, and then refuses to
    start.  The socket directory is private to this data dir, so its locks are ours."""
    if postmaster_pid(data_dir) is not None:
        return
    pidfile = data_dir / "postmaster.pid"
    try:
        stale = pidfile.read_text().split("\n", 1)[0].strip()
    except OSError:
        stale = None
    if remove_file(pidfile):
        log.warning("postgres_stale_pidfile_removed", pid=stale)
    with contextlib.suppress(OSError):
        for lock in socket_dir.glob(".s.PGSQL.*.lock"):
            remove_file(lock)
            remove_file(lock.with_suffix(""))


def socket_dir_value(socket_dir: Path, port: int, extra_dirs: Sequence[str] = ()) -> str:
    """``unix_socket_directories`` for ``socket_dir`` (the agent's own, first: the agent and
    its tools connect to the first entry) and then ``extra_dirs`` (the node file's): quoted
    where needed; a path that cannot be a socket directory is left out, with a warning."""
    out = []
    for i, path in enumerate([str(socket_dir), *extra_dirs]):
        what = "data_dir" if i == 0 else f"unix_socket_directories entry {path}"
        if len(path) + len(f"/.s.PGSQL.{port}") > MAX_SOCKET_PATH:
            log.warning("postgres_socket_disabled", reason=f"{what}: path too long for a Unix socket")
        elif '"' in path:
            log.warning("postgres_socket_disabled", reason=f"{what}: path contains a double quote")
        else:
            out.append(f'"{path}"' if any(c in path for c in ", \t") else path)
    return ",".join(out)


def render_conf(
    params: Mapping[str, ParamValue],
    role: Role,
    upstream: Upstream | None,
    *,
    listen_host: str,
    port: int,
    socket_dir: Path,
    replication_user: str,
    passfile: Path | None,
    application_name: str,
    conninfo_options: Mapping[str, str] | None = None,
    tls: TlsPaths | None = None,
    extra_socket_dirs: Sequence[str] = (),
) -> str:
    """postgresql.conf: ``params`` (minus the agent-owned names) and then what the agent sets,
    including ``primary_conninfo`` for a replica with an upstream and, with ``tls``, the
    server's certificate, key and CA files.  ``extra_socket_dirs`` (the node file's
    ``unix_socket_directories``) come after the agent's own socket directory."""
    merged: dict[str, ParamValue] = {}
    for name in sorted(params):
        if name.lower() == SOCKET_DIRS_PARAMETER:
            continue  # given as extra_socket_dirs
        if name.lower() in AGENT_OWNED_PARAMETERS - AGENT_SET_PARAMETERS:
            log.warning("postgres_param_ignored", param=name, reason="managed by hakeeper")
            continue
        merged[name] = params[name]
    merged["listen_addresses"] = listen_host or "*"
    merged["port"] = port
    merged["unix_socket_directories"] = socket_dir_value(socket_dir, port, extra_socket_dirs)
    merged["hot_standby"] = True
    merged["recovery_target_timeline"] = "latest"
    if tls is not None:
        merged["ssl"] = True
        merged["ssl_cert_file"] = str(tls.certfile)
        merged["ssl_key_file"] = str(tls.keyfile)
        merged["ssl_ca_file"] = str(tls.cafile)
    if role is Role.REPLICA and upstream is not None:
        merged["primary_conninfo"] = build_conninfo(
            host=upstream.host,
            port=upstream.port,
            user=replication_user,
            passfile=str(passfile) if passfile is not None else None,
            application_name=application_name,
            # PostgreSQL 17+'s slot sync worker connects to this database to read the primary's
            # failover slots; physical streaming ignores it (every major), so it is always set.
            dbname="postgres",
            gssencmode="disable",
            **(conninfo_options or {}),
        )
        if upstream.slot_name:
            merged["primary_slot_name"] = upstream.slot_name
    return render_postgresql_conf(merged)


def write_files(
    data_dir: Path,
    run_as: RunAs,
    *,
    conf: str,
    hba: str,
    ident: str,
    pgpass: str | None,
    pgpass_file: Path,
    socket_dir: Path,
    role: Role,
) -> None:
    """Write the rendered files (see the module docstring) atomically, then fsync the directory."""
    d = data_dir
    ra = run_as
    if pgpass is not None:
        if not pgpass_file.parent.is_dir():
            mkdir_owned(pgpass_file.parent, ra)
        write_atomic(pgpass_file, pgpass, mode=0o600, run_as=ra)
    else:
        remove_file(pgpass_file)
    if remove_file(d / PGPASS_NAME):
        # Left by an older version (or copied from a source that still has one).
        log.warning("postgres_stale_pgpass_removed", file=str(d / PGPASS_NAME), reason="secret in PGDATA")
    write_atomic(d / "postgresql.conf", conf, mode=0o600, run_as=ra)
    write_atomic(d / "pg_hba.conf", hba, mode=0o600, run_as=ra)
    write_atomic(d / "pg_ident.conf", ident, mode=0o600, run_as=ra)
    auto = d / "postgresql.auto.conf"
    try:
        old = auto.read_text()
    except FileNotFoundError:
        old = None
    if old is not None:
        new = clean_auto_conf(old)
        if new != old:
            write_atomic(auto, new, mode=0o600, run_as=ra)
            log.info("postgres_auto_conf_cleaned", file=str(auto))
    # Always 0700 (pg_basebackup and initdb --allow-group-access make it 0750): the superuser's
    # socket is trusted in pg_hba.conf, so only PostgreSQL's OS user may reach it.
    mkdir_owned(socket_dir, ra)
    remove_file(d / "recovery.signal")
    if role is Role.REPLICA:
        write_atomic(d / "standby.signal", "", mode=0o600, run_as=ra)
    else:
        remove_file(d / "standby.signal")
    fsync_dir(d)


def log_tail(log_file: Path, offset: int, lines: int = 20) -> str:
    """The last ``lines`` lines the server logged after byte ``offset`` (at most the last 64 KiB)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            data = f.read()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])
