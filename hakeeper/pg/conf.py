"""Rendering PostgreSQL configuration files and libpq strings (pure functions, no I/O).

Quoting follows the PostgreSQL 15 sources:

* ``postgresql.conf`` (guc-file.l): a quoted string is ``'...'``; inside it ``''`` is a quote,
  backslash escapes ``\\b \\f \\n \\r \\t``, octal ``\\ooo`` and ``\\<any>`` (the character itself);
  a raw newline ends the line, so it must be escaped.
* libpq conninfo (``conninfo_parse``): ``key=value`` pairs separated by whitespace; a value is
  either bare (no whitespace) or single-quoted; in both, a backslash escapes the next character.
* pg_hba.conf (hba.c): a double-quoted token is taken literally (a quoted ``all`` is a role
  named "all"); a double quote cannot appear inside a name.
* ``.pgpass``: ``host:port:database:user:password``; ``\\`` and ``:`` are escaped by a backslash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from hakeeper.core.cluster import guc_quorum
from hakeeper.core.config import AGENT_OWNED_PARAMETERS, DynamicConfig, ParamValue
from hakeeper.core.hba import hba_address, hba_line_problem

HEADER = (
    "# This file is managed by hakeeper, edits are overwritten.\n"
    "# Set parameters in the node's YAML (postgresql.parameters) or the cluster's dynamic config.\n"
)

_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_CONNINFO_KEY_RE = re.compile(r"^[a-z_]+$")
_CONNINFO_BARE_RE = re.compile(r"^[A-Za-z0-9_.,:/@+-]+$")
# A line of postgresql.conf / postgresql.auto.conf that sets a parameter: name, then '=' or blank.
_SETTING_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_$.]*)\s*(=|\s|$)")


def quote_conf_value(v: str | int | float | bool) -> str:
    """One parameter value as written in postgresql.conf.

    Booleans become ``on``/``off``, integers stay bare, everything else (floats included: a bare
    ``1e-05`` does not lex) is a single-quoted string.
    """
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"parameter value must be finite, got {v!r}")
        v = repr(v)
    if not isinstance(v, str):
        raise TypeError(f"unsupported parameter value type {type(v).__name__}")
    if "\x00" in v:
        raise ValueError("a parameter value cannot contain a NUL character")
    out = []
    for ch in v:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("''")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def check_param_name(name: str) -> str:
    if not _PARAM_NAME_RE.match(name):
        raise ValueError(f"invalid PostgreSQL parameter name {name!r}")
    return name


def render_postgresql_conf(params: Mapping[str, ParamValue]) -> str:
    """A complete postgresql.conf: the header, then one ``name = value`` line per parameter
    (in the given order)."""
    lines = [HEADER]
    for name, value in params.items():
        lines.append(f"{check_param_name(name)} = {quote_conf_value(value)}\n")
    return "".join(lines)


def sync_guc(dyn: DynamicConfig, names: tuple[str, ...], quorum: int = 0, guard: bool = False) -> str:
    """``synchronous_standby_names`` for ``names``.  With no names: ``'*'`` (commits wait for any
    standby) under ``synchronous_strict`` or while a new primary's ``guard`` lasts, else ``''``.

    Synchronous mode: ``FIRST n (all n names)``, every commit waits for every one of them.
    Quorum mode: ``ANY k (names)`` with k = ``quorum`` clamped to 1..len(names).  Names are
    double-quoted (a quote doubled), so any application_name is taken literally.
    """
    if dyn.replication_mode == "async":
        return ""
    if names:
        quoted = ", ".join('"' + n.replace('"', '""') + '"' for n in names)
        if dyn.replication_mode == "quorum":
            return f"ANY {guc_quorum(names, quorum)} ({quoted})"
        return f"FIRST {len(names)} ({quoted})"
    return "*" if dyn.synchronous_strict or guard else ""


def build_conninfo(**kw: str | int | None) -> str:
    """libpq ``key=value`` connection string; None values are skipped, values quoted as needed."""
    parts = []
    for key, value in kw.items():
        if value is None:
            continue
        if not _CONNINFO_KEY_RE.match(key):
            raise ValueError(f"invalid conninfo keyword {key!r}")
        if isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value)
        if "\x00" in text:
            raise ValueError(f"conninfo value for {key!r} contains a NUL character")
        if not _CONNINFO_BARE_RE.match(text):
            text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _hba_name(name: str) -> str:
    if not name or '"' in name or any(c in name for c in "\n\r\x00"):
        raise ValueError(f"role name {name!r} cannot be written to pg_hba.conf")
    return f'"{name}"'


_LOCAL_NETS = ("127.0.0.1/32", "::1/128")
# The pg_ident.conf map of the OS users that may be the superuser over a Unix socket.
IDENT_MAP = "hakeeper"
_ANY_NETS = ("0.0.0.0/0", "::/0")
# require_auth is a libpq 16 connection option; an older libpq refuses the whole string.
REQUIRE_AUTH_LIBPQ = 160000


def auth_options(libpq_version: int) -> dict[str, str]:
    """Connection options that make libpq refuse a server that does not ask for the password
    by SCRAM (a server, or an address hijacked through etcd, that answers with ``trust`` or
    plain-text ``password`` would otherwise be handed the password or a session): only for a
    libpq that knows ``require_auth`` (16+), since an older one fails to connect at all."""
    if libpq_version >= REQUIRE_AUTH_LIBPQ:
        return {"require_auth": "scram-sha-256"}
    return {}


# channel_binding is a libpq 13 connection option (sslmode=verify-full is much older).
CHANNEL_BINDING_LIBPQ = 130000


def tls_options(cafile: str | None, libpq_version: int) -> dict[str, str]:
    """Connection options for a connection to another member when TLS is configured (``cafile``
    is the CA that signed the members' certificates; None: no TLS, no options).

    ``sslmode=verify-full``: the server must present a certificate from that CA naming the host
    we dialled, so an address planted in etcd (or a hijacked one) cannot pose as a member.
    ``channel_binding=require``: SCRAM is bound to that TLS session (SCRAM-SHA-256-PLUS), so a
    man in the middle holding some other valid certificate cannot relay the authentication.
    ``sslrootcert`` names the file explicitly: libpq would otherwise look in ~/.postgresql."""
    if cafile is None:
        return {}
    opts = {"sslmode": "verify-full", "sslrootcert": cafile}
    # Unknown (0) counts as supported: every libpq of a PostgreSQL still maintained has it, and
    # one without it fails to connect (loudly) rather than connecting without the binding.
    if libpq_version == 0 or libpq_version >= CHANNEL_BINDING_LIBPQ:
        opts["channel_binding"] = "require"
    return opts


def replication_addresses(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """pg_hba.conf addresses for the members' ``hosts`` (deduplicated, sorted), and the hosts
    refused because they are no single host (see :func:`hakeeper.core.hba.hba_address`)."""
    addrs: set[str] = set()
    refused: set[str] = set()
    for host in hosts:
        addr = hba_address(host)
        if addr is None:
            refused.add(host)
        elif addr not in _LOCAL_NETS:
            addrs.add(addr)
    return sorted(addrs), sorted(refused)


def render_pg_hba(
    *,
    extra_lines: list[str],
    superuser: str,
    replication_user: str,
    replication_hosts: Iterable[str],
    tls: bool = False,
    shared_sockets: bool = False,
) -> str:
    """pg_hba.conf: the user's extra lines first, then the agent's.

    * ``local`` (Unix socket): the superuser without a password.  Safe because the socket is
      in ``<data_dir>/pg_stat_tmp``, a 0700 directory inside the 0700 data directory that the
      agent re-chmods on every write: only the PostgreSQL OS user and root reach the socket,
      and they can read the data files anyway.  With ``shared_sockets`` (the node file adds
      socket directories of its own, which other OS users may enter) ``trust`` would admit
      them too -- pg_hba cannot tell which directory a local connection came through -- so
      these lines use ``peer map=hakeeper`` instead: only the OS users of
      :func:`render_pg_ident` are the superuser, by the kernel's word on who connected.
    * ``host replication``: the replication role from loopback and from ``replication_hosts``
      only (the members' published addresses plus this node's own), by scram-sha-256.  With
      ``tls`` the members' lines are ``hostssl``: a member replicates only over TLS (loopback
      stays ``host``: it never leaves the machine).
    * ``host all all``: any address, by scram-sha-256 (never ``trust`` on a TCP line).

    Raises ValueError for an extra line that would break the file or trust TCP connections.
    """
    su = _hba_name(superuser)
    repl = _hba_name(replication_user)
    out = [HEADER]
    if extra_lines:
        out.append("# From postgresql.pg_hba in the node configuration\n")
        for line in extra_lines:
            problem = hba_line_problem(line)
            if problem is not None:
                raise ValueError(f"pg_hba line {line!r}: {problem}")
            out.append(line.rstrip() + "\n")
    out.append("# hakeeper\n")
    local_auth = f"peer map={IDENT_MAP}" if shared_sockets else "trust"
    rows: list[tuple[str, str, str, str, str]] = [
        ("local", "all", su, "", local_auth),
        ("local", "replication", su, "", local_auth),
    ]
    members, _ = replication_addresses(replication_hosts)
    for net in _LOCAL_NETS:
        rows.append(("host", "replication", repl, net, "scram-sha-256"))
    for net in members:
        rows.append(("hostssl" if tls else "host", "replication", repl, net, "scram-sha-256"))
    for net in (*_LOCAL_NETS, *_ANY_NETS):
        rows.append(("host", "all", "all", net, "scram-sha-256"))
    for kind, db, user, addr, meth in rows:
        out.append(f"{kind:<7} {db:<12} {user:<16} {addr:<14} {meth}\n")
    return "".join(out)


def render_pg_ident(*, superuser: str, os_users: Iterable[str]) -> str:
    """pg_ident.conf: map :data:`IDENT_MAP` lets each of ``os_users`` (PostgreSQL's OS user and
    the agent's) be ``superuser`` over a Unix socket (used by pg_hba's peer lines; pg_hba is
    first-match, so an OS user missing here is refused, not passed to the next line)."""
    su = _hba_name(superuser)
    out = [HEADER]
    for user in dict.fromkeys(os_users):
        out.append(f"{IDENT_MAP:<12} {_hba_name(user):<16} {su}\n")
    return "".join(out)


def first_socket_dir(value: str) -> str:
    """The first directory of a ``unix_socket_directories`` value (where a client connects:
    the agent's own directory comes first), without PostgreSQL's list quotes."""
    first = value.split(",", 1)[0].strip()
    return first[1:-1] if len(first) > 1 and first[0] == first[-1] == '"' else first


def clean_auto_conf(text: str, owned: Iterable[str] = AGENT_OWNED_PARAMETERS) -> str:
    """postgresql.auto.conf without the lines that set agent-owned parameters (names compare
    case-insensitively, as PostgreSQL does).  Comments and other settings are kept verbatim."""
    owned_lower = {o.lower() for o in owned}
    kept = []
    # Only "\n" ends a line for PostgreSQL (str.splitlines would also split on \x1e, \u2028...).
    for line in text.split("\n"):
        m = _SETTING_LINE_RE.match(line)
        if m and not line.lstrip().startswith("#") and m.group(1).lower() in owned_lower:
            continue
        kept.append(line)
    return "\n".join(kept)


def pgpass_escape(field: str) -> str:
    if any(c in field for c in "\n\r\x00"):
        raise ValueError("a .pgpass field cannot contain a line break or NUL")
    return field.replace("\\", "\\\\").replace(":", "\\:")


def render_pgpass(entries: Iterable[tuple[str, str, str, str, str]]) -> str:
    """``.pgpass`` lines from (host, port, database, user, password); ``*`` stays a wildcard."""
    lines = []
    for fields in entries:
        lines.append(":".join(f if f == "*" else pgpass_escape(f) for f in fields) + "\n")
    return "".join(lines)


def parse_controldata(text: str) -> dict[str, str]:
    """``pg_controldata`` output (C locale) as ``{"Database cluster state": "in production", ...}``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out
