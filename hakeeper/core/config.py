"""Node configuration (YAML + HAKEEPER_* environment) and cluster-wide dynamic settings.

Local settings live in the node's YAML file; environment variables override them
(``HAKEEPER_POSTGRESQL__DATA_DIR=/x``, nested keys joined by ``__``).  Settings that must agree
on every node live in etcd under ``<namespace>/<scope>/config`` as :class:`DynamicConfig`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hakeeper.core.backup_config import BackupConfig
from hakeeper.core.fencing import FENCER_KILL_GRACE, FENCER_POLL, MIN_KEEPALIVE_TIMEOUT, min_fence_margin
from hakeeper.core.hba import hba_line_problem
from hakeeper.core.lsn import parse_lsn
from hakeeper.core.validation import Loc, validate_collecting

ENV_PREFIX = "HAKEEPER_"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")  # always fullmatch: "$" accepts a trailing newline
# A PostgreSQL parameter name: a letter or underscore, then letters, digits, "_", "$" or "."
# (custom classes such as pg_stat_statements.max).
_PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$.]{0,62}")

# Parameters that run a command or load a library: never taken from etcd, where whoever can write
# the cluster's config key would otherwise run code as the postgres user on every node.  Set them
# in a node file (postgresql.parameters) if at all.
COMMAND_PARAMETERS = frozenset(
    {
        "archive_cleanup_command",
        "archive_command",
        "archive_library",
        "dynamic_library_path",
        "jit_provider",
        "local_preload_libraries",
        "recovery_end_command",
        "restore_command",
        "session_preload_libraries",
        "shared_preload_libraries",
        "ssl_passphrase_command",
    }
)

ParamValue = str | int | float | bool


def _scalar(value: object) -> object:
    # Checked before the union, so `shared_buffers: [1GB]` is one error, not one per member
    # of str | int | float | bool.
    if value is None or isinstance(value, list | dict):
        kind = "nothing" if value is None else f"a {'list' if isinstance(value, list) else 'mapping'}"
        raise ValueError(f"must be a string, number or boolean, not {kind}")
    return value


# A parameter's value as a field type (ParamValue stays the plain union for type hints).
_ParamField = Annotated[ParamValue, BeforeValidator(_scalar)]

# Passwords of the examples in deploy/ and the docs: a node file still carrying one was copied
# without being filled in, and every node would share a password anyone can read on the web.
_PLACEHOLDER_RE = re.compile(r"change[-_ ]?me", re.IGNORECASE)


def _not_placeholder(v: SecretStr | None) -> SecretStr | None:
    if v is not None and _PLACEHOLDER_RE.match(v.get_secret_value()):
        raise ValueError(
            "still the example's placeholder (CHANGE-ME...): generate a secret, e.g. "
            "`openssl rand -base64 24`"
        )
    return v


# Parameters the agent owns: users may not set them in `parameters`, because the agent writes
# them itself (per role) and a mismatch would silently break replication or fencing.
AGENT_OWNED_PARAMETERS = frozenset(
    {
        "port",
        "listen_addresses",
        "hba_file",
        "ident_file",
        "data_directory",
        "config_file",
        "primary_conninfo",
        "primary_slot_name",
        "recovery_target_timeline",
        "hot_standby",
        "synchronous_standby_names",
        # Logical slot failover (PostgreSQL 17+, docs/slots.md): set per role and major.
        "sync_replication_slots",
        "synchronized_standby_slots",
        # The agent's own socket stays in a directory only the PostgreSQL OS user can enter; a
        # node file may add directories of its own (see SOCKET_DIRS_PARAMETER), never etcd.
        "unix_socket_directories",
        # Written from postgresql.tls, pointing at the agent's private copies of the files.
        "ssl",
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_ca_file",
    }
)
# Of those, the ones the agent itself hands to the PostgreSQL layer in its parameters.
AGENT_SET_PARAMETERS = frozenset(
    {"synchronous_standby_names", "sync_replication_slots", "synchronized_standby_slots"}
)
# Of those, the one a node file may set: its directories are added after the agent's own
# private one (``sudo -u postgres psql`` finds the socket where Debian's tools look), and the
# superuser's local lines in pg_hba.conf then use peer authentication instead of trust.
SOCKET_DIRS_PARAMETER = "unix_socket_directories"


def socket_directories(value: ParamValue) -> list[str]:
    """The directories of a node file's ``unix_socket_directories`` (comma-separated absolute
    paths; empty entries dropped).  Raises ValueError for a value PostgreSQL or the agent could
    not use."""
    if not isinstance(value, str):
        raise ValueError(f"{SOCKET_DIRS_PARAMETER}: want comma-separated absolute directories")
    dirs = [d.strip() for d in value.split(",") if d.strip()]
    for d in dirs:
        # Quotes and control characters would need PostgreSQL's list quoting; no real
        # socket directory has them.
        if not d.startswith("/") or any(c in d for c in "\"'") or not d.isprintable():
            raise ValueError(f"{SOCKET_DIRS_PARAMETER}: {d!r} is not an absolute directory path")
    return dirs


def _check_parameters(params: dict[str, ParamValue]) -> None:
    """Parameter names PostgreSQL could take (no spaces, quotes or newlines that would end up in
    postgresql.conf), and values without a line break."""
    bad = sorted(repr(name) for name in params if not _PARAM_RE.fullmatch(name))
    if bad:
        raise ValueError(f"not a PostgreSQL parameter name: {', '.join(bad)}")
    broken = sorted(name for name, value in params.items() if isinstance(value, str) and "\n" in value)
    if broken:
        raise ValueError(f"a value may not contain a line break: {', '.join(broken)}")


def secret_value(s: SecretStr | None) -> str | None:
    """The plain text of an optional secret (only where it is handed to a program or server)."""
    return None if s is None else s.get_secret_value()


class ConfigError(Exception):
    """A configuration file or value is invalid.  ``errors`` is a list of (field, message)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = [f"{source}: {field}: {msg}" for field, msg in errors]
        super().__init__("\n".join(lines))


class _Strict(BaseModel):
    # Infinity and NaN are no value any setting can take (and JSON cannot store them back).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _split_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port_no = int(port)
    except ValueError as e:
        raise ValueError(f"invalid port in {value!r}") from e
    if not 0 < port_no < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, port_no


def _etcd_url(h: str) -> str:
    """One etcd client URL, checked here rather than at the first request (an aiohttp error
    at run time, or a port that can never connect)."""
    if "," in h:
        raise ValueError(f"{h!r}: one URL per list entry, not several joined by commas")
    if not h or any(c.isspace() for c in h):
        raise ValueError(f"{h!r}: a URL may not be empty or contain spaces")
    if "://" not in h:
        h = "http://" + h
    if not h.startswith(("http://", "https://")):
        raise ValueError(f"etcd host {h!r} must use http:// or https://")
    # Refused rather than masked: a URL is logged and shown in errors in many places,
    # and one forgotten place would print the password.
    if "@" in h.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(
            "etcd host URLs must not carry credentials (user:password@host); "
            "use etcd.username and etcd.password"
        )
    parts = urlsplit(h)
    if not parts.hostname:
        raise ValueError(f"{h!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in {h!r} (want 1-65535)") from None
    if port == 0:
        raise ValueError(f"invalid port in {h!r} (want 1-65535)")
    return h.rstrip("/")


class EtcdConfig(_Strict):
    hosts: list[Annotated[str, AfterValidator(_etcd_url)]] = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"],
        description="etcd client URLs (http:// or https://); the client rotates through them.",
        min_length=1,
    )
    request_timeout: float = Field(1.0, gt=0, le=30, description="Timeout of one etcd request (s).")
    cacert: Path | None = Field(None, description="CA bundle to verify etcd's certificate.")
    cert: Path | None = Field(None, description="Client certificate (PEM) for TLS client auth.")
    key: Path | None = Field(None, description="Client key (PEM) for TLS client auth.")
    username: str | None = Field(None, description="etcd user (etcd authentication).")
    password: SecretStr | None = Field(None, description="etcd password.")

    _placeholder = field_validator("password")(_not_placeholder)

    @model_validator(mode="after")
    def _pairs(self) -> EtcdConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be given together")
        return self


class ApiClientConfig(_Strict):
    """How the CLI calls members' APIs.  It sends the API credentials only to a member URL it
    can trust: this node's own API, a URL listed in ``urls``, or an https:// URL whose
    certificate verifies against ``cafile`` (host name checked), never merely because etcd
    says so."""

    urls: list[str] = Field(
        default_factory=list,
        description="API URLs of this cluster's other members that the CLI may send requests and "
        "credentials to (besides this node's own API).",
    )
    cafile: Path | None = Field(
        None,
        description="CA bundle the CLI verifies members' https:// API certificates against; with it, "
        "any https:// member URL whose certificate verifies (host name included) is trusted.",
    )
    certfile: Path | None = Field(
        None, description="Client certificate (PEM) the CLI presents to the members' APIs."
    )
    keyfile: Path | None = Field(None, description="Its private key (PEM; default: in certfile).")

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")) or "@" in url.split("://", 1)[1].split("/")[0]:
                raise ValueError(f"{url!r}: want http(s)://host:port without user:password@")
        return v

    @model_validator(mode="after")
    def _pair(self) -> ApiClientConfig:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("keyfile needs certfile")
        return self


class ApiConfig(_Strict):
    listen: str = Field("127.0.0.1:8008", description="host:port the REST API listens on.")
    connect_address: str | None = Field(
        None, description="host:port others use to reach this API (default: listen)."
    )
    username: str | None = Field(None, description="Basic-auth user for mutating endpoints.")
    password: SecretStr | None = Field(None, description="Basic-auth password.")
    token: SecretStr | None = Field(None, description="Bearer token for mutating endpoints.")
    allowlist: list[str] = Field(
        default_factory=list,
        description="Client addresses or CIDRs allowed to call mutating endpoints (empty: any).",
    )
    certfile: Path | None = Field(None, description="Server certificate (PEM); enables HTTPS.")
    keyfile: Path | None = Field(None, description="Server private key (PEM; default: in certfile).")
    cafile: Path | None = Field(None, description="CA bundle that client certificates must chain to.")
    verify_client: Literal["none", "optional", "required"] = Field(
        "none",
        description="Client certificates: none; optional (asked for, required by mutating "
        "endpoints); required (every connection). optional/required need cafile and certfile.",
    )
    max_connections: int = Field(
        2000,
        ge=1,
        le=100000,
        description="Concurrent connections; more are closed at once (health checks excepted: "
        "see health_reserve).",
    )
    max_connections_per_client: int = Field(
        100,
        ge=1,
        le=100000,
        description="Concurrent connections from one client address (an IPv6 /64); more are "
        "closed at once, health checks excepted (see health_reserve).",
    )
    health_reserve: int = Field(
        64,
        ge=0,
        le=10000,
        description="Connections beyond max_connections / max_connections_per_client kept for "
        "health checks: such a connection must send its request within 2 s and may only ask a "
        "health endpoint (GET/HEAD), answered then closed. 0: none.",
    )
    health_reserve_allowlist: list[str] = Field(
        default_factory=list,
        description="Client addresses or CIDRs that may use health_reserve (your load balancers; "
        "empty: any).",
    )
    request_timeout: float = Field(
        5.0, gt=0, le=300, description="A request's headers and body must arrive within this long (s)."
    )
    client: ApiClientConfig = Field(
        default_factory=ApiClientConfig,
        description="How the CLI calls members' APIs: which URLs it trusts, CA and client certificate.",
    )

    @field_validator("listen", "connect_address")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is not None:
            _split_hostport(v, 8008)
        return v

    _placeholder = field_validator("password", "token")(_not_placeholder)

    @field_validator("allowlist", "health_reserve_allowlist")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError as e:
                raise ValueError(f"not an address or CIDR: {item!r}") from e
        return [item.strip() for item in v]

    @model_validator(mode="after")
    def _tls(self) -> ApiConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be given together")
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("keyfile needs certfile")
        if self.verify_client != "none" and (self.certfile is None or self.cafile is None):
            raise ValueError(f"verify_client={self.verify_client} needs certfile and cafile")
        return self

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return _split_hostport(self.listen, 8008)

    @property
    def url(self) -> str:
        host, port = _split_hostport(self.connect_address or self.listen, 8008)
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.certfile is not None else "http"
        return f"{scheme}://{host}:{port}"


class Credentials(_Strict):
    username: str = Field(
        description="Role name (defaults: postgres for superuser, replicator for replication)."
    )
    password: SecretStr | None = Field(None, description="Password (scram-sha-256).")


PASSWORD_HINT = (
    "generate one (e.g. `openssl rand -base64 24`) and put it in the node file, or in the "
    "environment as {env}; every node of the cluster needs the same one"
)


class RoleCredentials(Credentials):
    """A role the agent creates and connects as: a password is required.  Without one pg_hba
    would have to trust TCP connections; and a password generated on one node would be of no
    use to the other nodes, which must know it to replicate or rewind."""

    password: SecretStr = Field(
        description="Password (scram-sha-256), required: the same on every node. Stored in "
        "PostgreSQL as a SCRAM verifier; the agent hands the replication password to PostgreSQL "
        "in a 0600 passfile outside the data directory."
    )

    @field_validator("password")
    @classmethod
    def _usable(cls, v: SecretStr) -> SecretStr:
        text = v.get_secret_value()
        if not text:
            raise ValueError("must not be empty")
        if any(c in text for c in "\n\r\x00"):
            raise ValueError("must not contain a line break or NUL")
        _not_placeholder(v)
        return v


class SuperuserCredentials(RoleCredentials):
    username: str = Field("postgres", description="Role name.")


class ReplicationCredentials(RoleCredentials):
    username: str = Field("replicator", description="Role name.")


class PostgresTls(_Strict):
    """TLS for PostgreSQL.  The files are checked when the configuration is loaded (exist,
    readable, the key not accessible to group or others) and copied by the agent into the
    node's runtime directory, owned by PostgreSQL's OS user with mode 0600, before every start."""

    certfile: Path = Field(
        description="This node's server certificate (PEM; may include intermediates). It must "
        "name the host other members connect to (connect_address) in its subjectAltName "
        "(IP address or DNS name): members connect with sslmode=verify-full."
    )
    keyfile: Path = Field(description="Its private key (PEM, unencrypted, mode 0600 or stricter).")
    cafile: Path = Field(
        description="CA certificate(s) (PEM) that signed every member's certificate: the agent, "
        "pg_basebackup, pg_rewind and the walreceiver verify the server they connect to against it."
    )


class PostgresConfig(_Strict):
    data_dir: Path = Field(description="PGDATA of this node.")
    bin_dir: Path | None = Field(
        None,
        description="Directory with initdb, pg_ctl, ... of the data directory's major (default: "
        "/usr/lib/postgresql/N/bin for the major N in data_dir/PG_VERSION, else PostgreSQL 15 on Debian).",
    )
    bin_dirs: dict[Annotated[int, Field(ge=15, le=99)], Path] = Field(
        default_factory=dict,
        description="Binaries of each PostgreSQL major, by major (`{17: /opt/pg17/bin, 18: /opt/pg18/bin}`): "
        "the data directory's major picks its entry before bin_dir (after a major upgrade the node "
        "runs the new major's without an edit), and `hakeeper upgrade --to-version N` uses N's "
        "(default for a major not listed: /usr/lib/postgresql/N/bin).",
    )
    listen: str = Field("127.0.0.1:5432", description="host:port PostgreSQL listens on.")
    connect_address: str | None = Field(
        None, description="host:port others use to reach this PostgreSQL (default: listen)."
    )
    # Required: their passwords have no default (see RoleCredentials).
    superuser: SuperuserCredentials = Field(description="The superuser the agent connects as.")
    replication: ReplicationCredentials = Field(description="The role replicas stream as.")
    parameters: dict[str, _ParamField] = Field(
        default_factory=dict, description="Node-local PostgreSQL parameters."
    )
    pg_hba: list[str] = Field(
        default_factory=list,
        description="Extra pg_hba.conf lines, placed before the agent's own. `trust` is refused on "
        "TCP (host*) lines.",
    )
    os_user: str | None = Field(
        None,
        description="OS user PostgreSQL runs as when the agent runs as root "
        "(default: owner of data_dir, else 'postgres').",
    )
    tls: PostgresTls | None = Field(
        None,
        description="TLS: the server offers it (ssl = on), members replicate only over TLS "
        "(hostssl lines for their addresses), and every agent connection to another member uses "
        "sslmode=verify-full and channel_binding=require.  Off: plain TCP (SCRAM still protects "
        "the password, not the data).",
    )
    use_pg_rewind: bool = Field(True, description="Rewind a diverged former primary (else re-clone).")
    remove_data_directory_on_rewind_failure: bool = Field(
        False,
        description="When pg_rewind fails (or use_pg_rewind is off), move the data directory aside "
        "(<data_dir>.failed-<UTC time>, never deleted) and clone again from the leader.  Off: the "
        "node stays down, says why in 'hakeeper list', and waits for 'hakeeper reinit'.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _all_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # A managed parameter is reported together with a bad value of another parameter.
        return validate_collecting(cls.__name__, data, handler, _raw_postgres_problems)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_given(cls, v: Any) -> Any:
        # An empty HAKEEPER_POSTGRESQL__DATA_DIR would otherwise become Path("."), the agent's
        # working directory.
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("bin_dirs")
    @classmethod
    def _bin_dirs_absolute(cls, v: dict[int, Path]) -> dict[int, Path]:
        relative = [f"{major}: {str(p)!r}" for major, p in v.items() if not p.is_absolute()]
        if relative:
            raise ValueError(f"must be absolute paths ({', '.join(relative)})")
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(
                f"{str(v)!r} must be an absolute path (a relative one would depend on the agent's "
                "working directory: / under systemd)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _role_sections(cls, data: Any) -> Any:
        """A missing superuser/replication section is an empty one, so that the error names
        what is really missing: ``postgresql.superuser.password``."""
        if isinstance(data, dict):
            data = {"superuser": {}, "replication": {}, **data}
        return data

    @field_validator("listen", "connect_address")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is not None:
            _split_hostport(v, 5432)
        return v

    @field_validator("parameters")
    @classmethod
    def _params(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        _check_parameters(params)
        problem = _managed_problem(params)
        if problem is not None:
            raise ValueError(problem)
        if SOCKET_DIRS_PARAMETER in params:
            socket_directories(params[SOCKET_DIRS_PARAMETER])
        return params

    @property
    def socket_dirs(self) -> list[str]:
        """The node file's own Unix socket directories (besides the agent's private one)."""
        value = self.parameters.get(SOCKET_DIRS_PARAMETER)
        return [] if value is None else socket_directories(value)

    @field_validator("pg_hba")
    @classmethod
    def _hba(cls, lines: list[str]) -> list[str]:
        for i, line in enumerate(lines):
            problem = hba_line_problem(line)
            if problem is not None:
                raise ValueError(f"line {i + 1} ({line!r}): {problem}")
        return lines

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return _split_hostport(self.listen, 5432)

    @property
    def connect_host_port(self) -> tuple[str, int]:
        return _split_hostport(self.connect_address or self.listen, 5432)


def _managed_problem(params: dict[str, Any]) -> str | None:
    owned = sorted(set(params) & (AGENT_OWNED_PARAMETERS - {SOCKET_DIRS_PARAMETER}))
    return f"managed by hakeeper, set them elsewhere: {', '.join(owned)}" if owned else None


def _raw_postgres_problems(data: Any) -> list[tuple[Loc, str]]:
    """PostgresConfig's parameter-name check on the raw section (see validate_collecting)."""
    params = data.get("parameters") if isinstance(data, dict) else None
    problem = _managed_problem(params) if isinstance(params, dict) else None
    return [(("parameters",), problem)] if problem is not None else []


class Tags(_Strict):
    nofailover: bool = Field(False, description="Never promote this node automatically.")
    failover_priority: int = Field(
        1, ge=0, description="Higher wins among equally caught-up candidates; 0 = never promote."
    )
    noloadbalance: bool = Field(False, description="Health checks report this replica unavailable.")
    nosync: bool = Field(False, description="Never choose this node as a synchronous standby.")
    sync_priority: int = Field(
        1, ge=0, description="Higher is chosen first as a synchronous standby; 0 = never."
    )


class LogConfig(_Strict):
    format: Literal["json", "console"] = Field(
        "console",
        description="json: one JSON object per line (for journald and log shippers); console: for humans.",
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level logged (DEBUG adds etcd re-lists and token refreshes)."
    )


class DynamicPostgres(_Strict):
    parameters: dict[str, _ParamField] = Field(
        default_factory=dict,
        description="Cluster-wide PostgreSQL parameters (must match on all nodes).  Parameters that "
        "run a command or load a library (restore_command, shared_preload_libraries, ...) are refused "
        "here: whoever can write etcd would run code on every node; set them in a node file.",
    )

    @field_validator("parameters")
    @classmethod
    def _params(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        _check_parameters(params)
        owned = sorted(set(params) & AGENT_OWNED_PARAMETERS)
        if owned:
            raise ValueError(f"managed by hakeeper: {', '.join(owned)}")
        commands = sorted(name for name in params if name.lower() in COMMAND_PARAMETERS)
        if commands:
            raise ValueError(
                f"runs a command or loads a library, never taken from the cluster-wide config: "
                f"{', '.join(commands)} (set it in a node file's postgresql.parameters)"
            )
        return params


# Parameters the cluster needs for replication; users may raise them.
DEFAULT_CLUSTER_PARAMETERS: dict[str, ParamValue] = {
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "128MB",
    "wal_log_hints": "on",
    "hot_standby_feedback": "on",
    "max_connections": 100,
    "password_encryption": "scram-sha-256",
    "wal_retrieve_retry_interval": "1s",
    # Standbys report at least every second, so a sync standby behind a partition is noticed
    # (reply_time stops) within a ttl instead of wal_sender_timeout's default minute.
    "wal_receiver_status_interval": "1s",
    "wal_sender_timeout": "10s",
    "wal_receiver_timeout": "10s",
}


# A permanent slot's name: what PostgreSQL accepts for a slot, lower case only (a member's own
# slot comes from slot_name_for, which maps to the same alphabet).
SLOT_NAME_RE = re.compile(r"[a-z0-9_]{1,63}")
_IDENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_$.-]{0,62}")


class PermanentSlot(_Strict):
    """A replication slot the primary keeps, whoever the primary is (docs/slots.md)."""

    type: Literal["logical", "physical"] = Field(
        description="logical: for a logical consumer (created with failover on PostgreSQL 17+); "
        "physical: for an external standby or WAL receiver (reserves WAL from its creation)."
    )
    database: str | None = Field(None, description="logical: the database the slot decodes.")
    plugin: str | None = Field(None, description="logical: the output plugin (pgoutput, test_decoding...).")

    @field_validator("database", "plugin")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        if v is not None and not _IDENT_RE.fullmatch(v):
            raise ValueError("use 1-63 letters, digits, '_', '$', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _kind(self) -> PermanentSlot:
        if self.type == "logical":
            for name in ("database", "plugin"):
                if getattr(self, name) is None:
                    raise _field_error(self, (name,), None, "a logical slot needs a database and a plugin")
        else:
            for name in ("database", "plugin"):
                if getattr(self, name) is not None:
                    raise _field_error(self, (name,), getattr(self, name), "only for a logical slot")
        return self


class DynamicConfig(_Strict):
    """Cluster-wide settings stored in etcd (``<prefix>/config``)."""

    ttl: int = Field(5, ge=2, le=3600, description="Leader lease TTL (s).")
    loop_wait: float = Field(1.0, gt=0, le=60, description="HA loop period (s).")
    keepalive_interval: float = Field(
        1.0, gt=0, le=60, description="How often the lease is kept alive (s), on its own task."
    )
    fence_margin: float = Field(
        2.5,
        ge=0.2,
        description="The primary fences itself this long before its lease could expire (s); at "
        "least the fencer's poll + kill grace + etcd.request_timeout.",
    )
    maximum_lag_on_failover: int = Field(
        1048576, ge=0, description="A replica further behind (bytes) is never promoted."
    )
    primary_start_timeout: float = Field(
        30, ge=0, description="How long a crashed primary may take to restart in place (s)."
    )
    member_slots_ttl: float = Field(
        1800, ge=0, description="Keep the slot of an absent member this long (s)."
    )
    candidate_grace: float = Field(
        2.0, ge=0, description="After this long without a leader, the next-best candidate campaigns (s)."
    )
    replication_mode: Literal["async", "synchronous", "quorum"] = Field(
        "async",
        description="async: commits never wait for replicas. synchronous: commits wait for every "
        "standby of the sync set (FIRST n of exactly those n names) and only sync-set members are "
        "promoted automatically. quorum: every healthy standby is a voter and commits wait for "
        "synchronous_node_count of them (ANY k); a voter is promoted automatically only when "
        "enough voters are reachable to be sure it has every acknowledged commit.",
    )
    synchronous_node_count: int = Field(
        1,
        ge=1,
        le=16,
        description="synchronous: size of the sync set. quorum: how many voters acknowledge each "
        "commit (k of ANY k, at most the number of voters).",
    )
    synchronous_strict: bool = Field(
        False,
        description="With no healthy sync standby (or voter), commits wait "
        "(synchronous_standby_names '*') instead of falling back to async.",
    )
    maximum_lag_on_syncnode: int = Field(
        -1,
        ge=-1,
        description="A sync standby (or voter) further behind (bytes) is swapped out; -1 = never.",
    )
    switchover_timeout: float = Field(
        30, gt=0, description="A switchover or manual failover not done within this long is abandoned (s)."
    )
    pause: bool = Field(
        False,
        description="Maintenance mode: no automatic failover, no restart of a stopped PostgreSQL "
        "(fencing and demotion of a second writable node stay on).",
    )
    postgresql: DynamicPostgres = Field(default_factory=DynamicPostgres)
    slots: dict[str, PermanentSlot] = Field(
        default_factory=dict,
        description="Permanent replication slots the primary keeps (and, on PostgreSQL 17+, its "
        "failover candidates keep in sync): name -> {type: logical, database, plugin} or "
        "{type: physical}.  Dropped only when removed from here (docs/slots.md).",
    )

    @field_validator("slots")
    @classmethod
    def _slot_names(cls, slots: dict[str, PermanentSlot]) -> dict[str, PermanentSlot]:
        bad = sorted(n for n in slots if not SLOT_NAME_RE.fullmatch(n))
        if bad:
            raise ValueError(
                f"slot name {bad[0][:80]!r}: use 1-63 lower-case letters, digits and '_' "
                "(PostgreSQL's slot names)"
            )
        return slots

    @model_validator(mode="after")
    def _logical_needs_wal_level(self) -> DynamicConfig:
        logical = sorted(n for n, s in self.slots.items() if s.type == "logical")
        level = str(self.cluster_parameters().get("wal_level", "")).lower()
        if logical and level != "logical":
            raise _field_error(
                self,
                ("slots", logical[0]),
                self.slots[logical[0]].type,
                f"a logical slot needs postgresql.parameters.wal_level: logical (now {level or 'unset'}); "
                "set both in one change, then restart every member (wal_level applies at a restart)",
            )
        return self

    @model_validator(mode="after")
    def _timing(self) -> DynamicConfig:
        if self.keepalive_interval + self.fence_margin >= self.ttl:
            raise ValueError(
                f"keepalive_interval ({self.keepalive_interval}) + fence_margin ({self.fence_margin}) "
                f"must be below ttl ({self.ttl})"
            )
        # Cluster-wide, the etcd request timeout of each node is unknown: the shortest keepalive
        # timeout the agent ever uses stands in for it (each node caps its keepalive's timeout
        # so that it fits; a node file's own check uses its etcd.request_timeout).
        floor = round(FENCER_POLL + FENCER_KILL_GRACE + MIN_KEEPALIVE_TIMEOUT, 6)
        if self.fence_margin < floor:
            raise _field_error(
                self,
                ("fence_margin",),
                self.fence_margin,
                f"{self.fence_margin} s is too small: the fencer needs up to {FENCER_POLL} s (poll) + "
                f"{FENCER_KILL_GRACE} s (SIGQUIT->SIGKILL grace) + {MIN_KEEPALIVE_TIMEOUT} s (the "
                f"shortest keepalive timeout) = {floor} s after the fence deadline",
            )
        return self

    def cluster_parameters(self) -> dict[str, ParamValue]:
        return {**DEFAULT_CLUSTER_PARAMETERS, **self.postgresql.parameters}


class FromBackupConfig(_Strict):
    """Bootstrap a new cluster from a base backup instead of initdb (docs/backup-bootstrap.md).

    At most one target; none means ``latest`` (everything archived)."""

    repo: str | None = Field(
        None, description="Repository to restore from (default: the repositories in order, first that can)."
    )
    backup: str | None = Field(None, description="Backup id (default: the newest one before the target).")
    scope: str | None = Field(
        None,
        description="Scope of the source cluster in the repository (default: this cluster's scope). "
        "A different scope makes a new cluster from another one's backup; this cluster's own scope "
        "must then be empty in every repository.",
    )
    target_time: str | None = Field(
        None, description="ISO 8601 time to recover to; without a zone it is local time."
    )
    target_lsn: str | None = Field(None, description="WAL position to recover to (e.g. 0/3000148).")
    target_xid: int | None = Field(None, ge=3, description="Transaction id to recover to.")
    target_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        description="Restore point (pg_create_restore_point).",
    )
    latest: bool = Field(False, description="Recover everything archived (the default without a target).")
    exclusive: bool = Field(False, description="Stop just before the target (time, LSN, xid).")
    target_timeline: int | Literal["latest", "current"] = Field(
        "latest", description="Timeline to follow: a number, latest or current (the backup's own)."
    )
    timeout: float = Field(3600.0, gt=0, description="Seconds recovery may take before the bootstrap fails.")

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.fullmatch(v):
            raise ValueError("use 1-63 letters, digits, '_', '-' or '.'")
        return v

    @field_validator("target_time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            parse_target_time(v)
        return v

    @field_validator("target_lsn")
    @classmethod
    def _lsn(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_lsn(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an LSN (like 0/3000148)") from None
        return v

    @field_validator("target_timeline")
    @classmethod
    def _tli(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> FromBackupConfig:
        given = [
            k
            for k in ("target_time", "target_lsn", "target_xid", "target_name")
            if getattr(self, k) is not None
        ] + (["latest"] if self.latest else [])
        if len(given) > 1:
            raise ValueError(f"give at most one target, not {', '.join(given)}")
        return self


def parse_user_time(text: str, example: str = "2026-11-24T07:15:00+01:00") -> dt.datetime:
    """ISO 8601 with ``Z`` or an offset (kept); a time without a zone is local time.  The one
    parser of times users give (``--target-time``, ``--scheduled``, ``bootstrap.from_backup``)."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. {example})") from None
    return when.astimezone() if when.tzinfo is None else when


def parse_target_time(text: str) -> dt.datetime:
    """A recovery target time (see :func:`parse_user_time`), in UTC."""
    return parse_user_time(text).astimezone(dt.UTC)


class BootstrapConfig(_Strict):
    dcs: DynamicConfig = Field(
        default_factory=DynamicConfig,
        description="Initial dynamic settings, written to etcd by the node that initializes the cluster.",
    )
    initdb: list[str] = Field(
        default_factory=lambda: ["--data-checksums", "--encoding=UTF8", "--locale=C"],
        description="Extra initdb arguments.",
    )
    from_backup: FromBackupConfig | None = Field(
        None,
        description="Instead of initdb, the node that initializes the cluster restores this base backup "
        "from `backup.repositories`, recovers to the target and promotes on a new timeline "
        "(docs/backup-bootstrap.md).",
    )


class NodeConfig(BaseSettings):
    """One node's YAML file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )
    # The node file's content, already parsed (load_node_config): below the environment.
    _file_data: ClassVar[dict[str, Any] | None] = None

    scope: str = Field(description="Cluster name; every node of one cluster uses the same.")
    namespace: str = Field("/hakeeper", description="etcd key prefix above the scope.")
    name: str = Field(description="This member's unique name.")
    etcd: EtcdConfig = Field(default_factory=EtcdConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    postgresql: PostgresConfig
    tags: Tags = Field(default_factory=Tags)
    log: LogConfig = Field(default_factory=LogConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    backup: BackupConfig = Field(
        default_factory=BackupConfig, description="Backup repositories and WAL archiving."
    )

    @field_validator("scope", "name")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError("use 1-63 letters, digits, '_', '-' or '.'")
        return v

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        v = "/" + v.strip("/")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._file_data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=cls._file_data))
        return tuple(sources)

    @model_validator(mode="after")
    def _fence_margin_fits_the_fencer(self) -> NodeConfig:
        # The fencer stops PostgreSQL at most poll + grace after the deadline, and the deadline
        # came from a keepalive that may have taken up to the request timeout: the margin before
        # the lease can expire must cover all three, or an old primary may still write when
        # another node is promoted.
        margin, timeout = self.bootstrap.dcs.fence_margin, self.etcd.request_timeout
        need = min_fence_margin(timeout)
        if margin < need:
            raise _field_error(
                self,
                ("bootstrap", "dcs", "fence_margin"),
                margin,
                f"{margin} s is too small: the fencer needs up to {FENCER_POLL} s (poll) + "
                f"{FENCER_KILL_GRACE} s (SIGQUIT->SIGKILL grace) + {timeout} s (etcd.request_timeout, "
                f"the keepalive's timeout) = {need} s after the fence deadline to stop PostgreSQL; "
                f"raise fence_margin (and ttl) or lower etcd.request_timeout",
            )
        return self

    @property
    def prefix(self) -> str:
        return f"{self.namespace}/{self.scope}"


def _field_error(model: BaseModel, loc: tuple[str, ...], value: object, message: str) -> ValidationError:
    """A validation error located at ``loc`` (a cross-field check is reported at the field the
    user must change, not at the top level)."""
    detail = InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=loc, input=value
    )
    return ValidationError.from_exception_data(type(model).__name__, [detail])


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


_MISSING_HINTS: dict[tuple[str, ...], str] = {
    ("postgresql", role, "password"): PASSWORD_HINT.format(
        env=f"{ENV_PREFIX}POSTGRESQL__{role.upper()}__PASSWORD"
    )
    for role in ("superuser", "replication")
}


# pydantic's prefix of a ValueError raised by a validator: noise in front of our own message.
_VALUE_ERROR_PREFIX = "Value error, "


def format_validation_error(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        msg = err["msg"].removeprefix(_VALUE_ERROR_PREFIX)
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
            hint = _MISSING_HINTS.get(tuple(str(p) for p in err["loc"]))
            if hint is not None:
                msg = f"{msg}: {hint}"
        out.append((_loc(err["loc"]), msg))
    return out


def _decode(raw: bytes, src: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            src, [(f"line {line}", f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")]
        ) from None


def _key_path(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def _duplicate_keys(node: yaml.Node, path: tuple[str | int, ...], seen: set[int]) -> list[tuple[str, str]]:
    """Keys given twice in one mapping, anywhere in the document: YAML keeps the last one
    silently (a second ``postgresql:`` would drop the first, passwords included)."""
    if id(node) in seen:  # an alias of a node already walked
        return []
    seen.add(id(node))
    out: list[tuple[str, str]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key in first:
                out.append(
                    (
                        _key_path((*path, key)),
                        f"duplicate key {key!r} at lines {first[key]} and {line} (YAML would keep "
                        "only the last one, silently)",
                    )
                )
            else:
                first[key] = line
            out += _duplicate_keys(value_node, (*path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, (*path, i), seen)
    return out


def parse_yaml_strict(text: str, src: str) -> Any:
    """The YAML document in ``text``; ConfigError for a syntax error or a key given twice."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        dups = [] if node is None else _duplicate_keys(node, (), set())
        if dups:
            raise ConfigError(src, dups)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise ConfigError(src, [(where, f"invalid YAML: {getattr(e, 'problem', e)}")]) from None


def _unwrap(annotation: Any) -> list[Any]:
    """The members of an annotation (``X | None`` -> [X, None], ``Annotated[X, ...]`` -> [X])."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _unwrap(a)]
    return [annotation]


def _env_field(var: str) -> tuple[str, bool] | None:
    """For ``HAKEEPER_ETCD__HOSTS``: ("etcd.hosts", True when the value must be JSON), or None
    when the variable names no field."""
    model: Any = NodeConfig
    names: list[str] = []
    annotation: Any = None
    for part in var.removeprefix(ENV_PREFIX).lower().split("__"):
        fields = getattr(model, "model_fields", None) if model is not None else None
        if not fields or part not in fields:
            return None
        names.append(part)
        annotation = fields[part].annotation
        models = [m for m in _unwrap(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
        model = models[0] if models else None
    members = _unwrap(annotation)
    as_json = any(
        typing.get_origin(m) in (list, dict, set, tuple) or (isinstance(m, type) and issubclass(m, BaseModel))
        for m in members
    )
    return ".".join(names), as_json


def _env_errors(cause: BaseException | None) -> list[tuple[str, str]]:
    """Which HAKEEPER_* variables pydantic-settings could not parse (it names only the section)."""
    out = []
    for var in sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX)):
        found = _env_field(var.upper())
        if found is None or not found[1]:
            continue
        try:
            json.loads(os.environ[var])
        except ValueError as e:
            out.append(
                (
                    f"env {var}",
                    f"not valid JSON ({found[0]} is a list or section: give it as JSON, e.g. "
                    f'["https://10.0.0.1:2379"] or {{"key": "value"}}): {e}',
                )
            )
    return out or [("(environment)", f"{cause or 'an override could not be parsed'}")]


def load_node_config(path: str | Path) -> NodeConfig:
    """Load and validate a node YAML file plus HAKEEPER_* env overrides.

    Raises :class:`ConfigError` naming the file and every bad field.
    """
    p = Path(path)
    src = str(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(src, [("(file)", e.strerror or str(e))]) from e
    data = parse_yaml_strict(_decode(raw, src), src)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(src, [("(top level)", "must be a mapping of keys to values")])
    NodeConfig._file_data = data
    try:
        return NodeConfig()
    except SettingsError as e:
        raise ConfigError(src, _env_errors(e.__cause__)) from None
    except ValidationError as e:
        errors = format_validation_error(e)
        env_keys = {k for k in os.environ if k.startswith(ENV_PREFIX)}
        if env_keys:
            errors.append(("(environment)", f"overrides in effect: {', '.join(sorted(env_keys))}"))
        raise ConfigError(src, errors) from e
    finally:
        NodeConfig._file_data = None


def parse_dynamic_config(data: Any, source: str = "etcd config") -> DynamicConfig:
    try:
        return DynamicConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from e
