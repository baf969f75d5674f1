"""What may go into pg_hba.conf (pure checks, no I/O).

Two inputs reach pg_hba.conf from outside the agent: the node file's own ``postgresql.pg_hba``
lines, and the ``host`` every member publishes in etcd (replication is admitted from the
members' addresses).  The first is checked when the node file is loaded, the second each time
the file is rendered: a member record is hostile input (whoever can write etcd writes it).
"""

from __future__ import annotations

import ipaddress
import re

# Connection types that accept TCP connections (hba.c); `local` is the Unix socket.
_TCP_TYPES = frozenset({"host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc"})
# The other records a line may hold: the Unix socket, and the inclusion directives of PostgreSQL 16+.
_OTHER_RECORDS = frozenset({"local", "include", "include_if_exists", "include_dir"})
# Words pg_hba.conf reads as something other than a host name in the address column, and the
# method names (harmless in that column, but a line that reads "... trust scram-sha-256" should
# not even look like a trust line to whoever audits the file).
_ADDRESS_KEYWORDS = frozenset(
    {"all", "samehost", "samenet"}
    | {"trust", "reject", "md5", "password", "gss", "sspi", "ident", "peer", "pam", "ldap", "radius", "cert"}
)
# A DNS name: labels of letters, digits and inner hyphens.  The last label must start with a
# letter: libc's numeric parser (which hba.c tries first) takes "1234", "10.1" or "0x7f.1" as
# IPv4 addresses, and an address without a mask makes the whole file fail to load.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?:{_LABEL}\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?")


def hba_tokens(line: str) -> list[tuple[str, bool]]:
    """The fields of one pg_hba.conf line as (text, was quoted), up to a ``#`` comment."""
    tokens: list[tuple[str, bool]] = []
    cur: list[str] = []
    quoted = in_quotes = False
    for ch in line:
        if in_quotes:
            if ch == '"':
                in_quotes = False
            else:
                cur.append(ch)
        elif ch == '"':
            in_quotes = quoted = True
        elif ch == "#":
            break
        elif ch in " \t,":
            if cur or quoted:
                tokens.append(("".join(cur), quoted))
            cur, quoted = [], False
        else:
            cur.append(ch)
    if cur or quoted:
        tokens.append(("".join(cur), quoted))
    return tokens


def hba_line_problem(line: str) -> str | None:
    """Why ``line`` may not be added to pg_hba.conf, or None.

    Refused: a line break (one list item must stay one record), a trailing backslash (it would
    continue onto the agent's next line), and ``trust`` on any TCP line: anyone who can reach
    the port would log in as that role without a password.  ``local`` lines may trust: the
    agent keeps the socket in a directory only the PostgreSQL OS user can enter.
    """
    if any(c in line for c in "\n\r\x00"):
        return "contains a line break"
    if line.rstrip().endswith("\\"):
        return "ends with a backslash (pg_hba.conf would continue it onto the next line)"
    if _unterminated_quote(line):
        # PostgreSQL would refuse the whole file (and keep, or at start lack, the old one); and
        # what the line means is not what it looks like (`host"trust` is one token to it)
        return "has an unterminated double quote"
    # PostgreSQL compares the connection type and the method without regard to quoting
    # (hba.c parse_hba_line: `"host" ... "trust"` is a host line with trust), so neither do we.
    tokens = hba_tokens(line)
    if not tokens:
        return None
    kind = tokens[0][0].lower()
    if kind not in _TCP_TYPES | _OTHER_RECORDS:
        # PostgreSQL would refuse the whole file (at start: not start)
        return f"unknown connection type {tokens[0][0]!r} (local, host, hostssl, hostnossl, ...)"
    if kind not in _TCP_TYPES:
        return None
    if any(text.lower() == "trust" for text, _quoted in tokens[1:]):
        return "trust on a TCP line lets anyone who reaches the port in without a password; use scram-sha-256"
    return None


def _unterminated_quote(line: str) -> bool:
    in_quotes = False
    for ch in line:
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == "#" and not in_quotes:
            break
    return in_quotes


def hba_address(host: str) -> str | None:
    """The pg_hba.conf address that admits exactly ``host``: an IP literal as a /32 or /128
    network, a DNS name as it is (PostgreSQL matches it by a reverse then forward lookup of the
    client).  None for anything else (a network, a keyword such as ``all`` or ``samenet``, a
    ``.suffix`` pattern, an IPv6 zone, text with spaces...), which would admit more than one
    host or break the file."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            return None
        return f"{ip.compressed}/{ip.max_prefixlen}"
    if len(host) > 253 or host.lower() in _ADDRESS_KEYWORDS or not _HOSTNAME_RE.fullmatch(host):
        return None
    return host
