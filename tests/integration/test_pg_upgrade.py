"""hakeeper.pg.upgrade against real servers: one major pair per test (ports 36300-36399)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakeeper.core.config import DynamicConfig, ParamValue
from hakeeper.localcluster import pgbuilds
from hakeeper.pg import Postgres, Role
from hakeeper.pg.upgrade import (
    Method,
    check_upgrade,
    continue_timeline,
    init_new_cluster,
    inspect_cluster,
    new_cluster_started,
    run_upgrade,
)
from hakeeper.util.proc import resolve_run_as
from tests.support.pg import DEFAULT_PARAMS, PgArea

pytestmark = pytest.mark.integration

PARAMS: dict[str, ParamValue] = {**DynamicConfig().cluster_parameters(), **DEFAULT_PARAMS}
CHECKSUM_SQL = "SELECT count(*), md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)) FROM t"


def bin_dir(major: int) -> Path:
    return pgbuilds.reachable_bin_dir(major, resolve_run_as(Path("/tmp/hk-pg-probe")))


def node(area: PgArea, name: str, port: int, major: int, data_dir: Path | None = None) -> Postgres:
    overrides: dict[str, object] = {"bin_dir": bin_dir(major)}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
        area.data_dirs.append(data_dir)  # the area's cleanup kills its postmaster too
    return Postgres(area.node_config(name, port=port, **overrides), member_name=name)


async def start(pg: Postgres) -> None:
    await pg.write_config(PARAMS, Role.PRIMARY, None, replication_password="repl-secret")
    await pg.start(timeout=60)


async def sysid(pg: Postgres) -> str:
    value = await pg.system_identifier()
    assert value is not None
    return value


async def test_link_upgrade_17_to_18(area: PgArea) -> None:
    old = node(area, "old", 36301, 17)
    new: Postgres | None = None
    try:
        await old.initdb(["--encoding=UTF8", "--locale=C"])  # 17's default: no checksums
        await start(old)
        await old.session.execute(
            "CREATE TABLE t (id int PRIMARY KEY, payload text);"
            " INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g"
        )
        before = await old.session.execute(CHECKSUM_SQL)
        assert before[0][0] == 5000
        old_sysid = await sysid(old)
        facts = await inspect_cluster(
            old.data_dir, old.bin_dir, old.run_as, host=str(old.socket_dir), port=36301, user="postgres"
        )
        assert (facts.major, facts.checksums, facts.encoding, facts.superuser) == (
            17,
            False,
            "UTF8",
            "postgres",
        )
        assert facts.wal_segment_bytes == 16 * 1024 * 1024

        new_dir = await init_new_cluster(facts, bin_dir(18), old.run_as)
        assert new_dir == old.data_dir.with_name("data.18")
        assert facts.timeline == 1
        await continue_timeline(bin_dir(18), new_dir, facts.timeline + 1, old.run_as)
        problems = await check_upgrade(
            facts,
            bin_dir(18),
            new_dir,
            method=Method.LINK,
            run_as=old.run_as,
            old_port=36301,
            new_port=36302,
            socket_dir=old.socket_dir,
        )
        assert problems == []
        assert old.is_running()  # --check left the old server up

        await old.stop("fast")
        result = await run_upgrade(
            facts, bin_dir(18), new_dir, method=Method.LINK, run_as=old.run_as, old_port=36301, new_port=36302
        )
        labels = [s.label for s in result.steps]
        assert "Linking user relation files" in labels and all(s.status == "ok" for s in result.steps)
        assert sum(s.seconds for s in result.steps) <= result.seconds + 1
        assert any(p.name == "delete_old_cluster.sh" for p in result.leftovers)
        assert (old.data_dir / "global" / "pg_control.old").exists()
        assert result.system_identifier != old_sysid

        assert not new_cluster_started(new_dir)  # only pg_upgrade's own (-b) starts so far
        # pg_upgrade's own pg_resetwal (timeline 1) kept the higher timeline set before it
        assert (new_dir / "pg_wal" / "00000002.history").read_text().startswith("# hakeeper")
        new = node(area, "old", 36303, 18, data_dir=new_dir)
        await start(new)
        assert new_cluster_started(new_dir)
        assert (await new.session.execute("SELECT current_setting('server_version_num')::int / 10000")) == [
            (18,)
        ]
        assert (await new.session.execute("SHOW data_checksums")) == [("off",)]
        assert await new.session.execute(CHECKSUM_SQL) == before
        assert await sysid(new) == result.system_identifier
        # the WAL goes on from the new timeline, and the server writes there
        assert await new.session.execute("SELECT timeline_id FROM pg_control_checkpoint()") == [(2,)]
        await new.session.execute("INSERT INTO t VALUES (0, 'after')")
        (walfile,) = (await new.session.execute("SELECT pg_walfile_name(pg_current_wal_lsn())"))[0]
        assert str(walfile).startswith("00000002")
        old_names = {p.name for p in (old.data_dir / "pg_wal").iterdir()}
        assert str(walfile) not in old_names
        # the history file reads as a timeline without parent (a standby fetches it from here)
        rows = await new.session.execute("SELECT pg_read_file('pg_wal/00000002.history')")
        assert "hakeeper" in str(rows[0][0])
    finally:
        if new is not None:
            await new.stop("immediate")
        await old.stop("immediate")
