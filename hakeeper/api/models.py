"""Request bodies of the mutating endpoints (unknown fields and wrong types are 400s)."""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Member names are at most 63 characters (core/config.py); anything longer cannot name one.
NAME_MAX = 63


class SwitchoverBody(_Body):
    leader: str | None = Field(
        None, min_length=1, max_length=NAME_MAX, description="Expected current leader (checked)."
    )
    candidate: str | None = Field(
        None, min_length=1, max_length=NAME_MAX, description="Member to hand over to."
    )
    # ISO 8601 strings are accepted even in strict mode when parsed from JSON.
    scheduled_at: AwareDatetime | None = Field(None, description="When (ISO 8601 with a timezone).")
    allow_unsynced_slots: StrictBool = Field(
        False,
        description="Hand over even to a candidate without a synced copy of every failover slot: "
        "the logical consumers of the slots it lacks lose their position.",
    )


class FailoverBody(_Body):
    candidate: str = Field(min_length=1, max_length=NAME_MAX, description="Member to promote.")
    allow_data_loss: StrictBool = Field(
        False, description="Promote even an ineligible candidate: writes it has not received are lost."
    )
    allow_unsynced_slots: StrictBool = Field(
        False,
        description="With a leader: promote even a candidate without a synced copy of every "
        "failover slot (its logical consumers lose their position).",
    )


class MemberBody(_Body):
    """POST /restart, /reinitialize, /reload: the member the request is meant for.  Required: an
    agent acts only on a request that names it (a request that reached the wrong agent, e.g.
    through a loopback ``api_url``, must not act there)."""

    member: str = Field(min_length=1, max_length=NAME_MAX, description="The member meant (checked).")


class RestartBody(MemberBody):
    """POST /restart: now, at ``scheduled_at``, and/or only when a restart is pending."""

    scheduled_at: AwareDatetime | None = Field(
        None, description="Restart at this time (ISO 8601 with a timezone) instead of now."
    )
    pending: StrictBool = Field(
        False,
        description="Only if PostgreSQL has parameter changes pending a restart (checked when it runs).",
    )


class ReinitBody(MemberBody):
    """POST /reinitialize: clone again, or (``delta``) bring the old copy to the newest backup."""

    delta: StrictBool = Field(
        False,
        description=(
            "Keep the old copy and fetch and write only the blocks that differ from the newest backup "
            "(one with a file index), then replay the archive and stream; without a usable backup: a clone."
        ),
    )


class EmptyBody(_Body):
    """DELETE /switchover takes no parameters (an empty body or ``{}``)."""


UPGRADE_ID = r"^[A-Za-z0-9_-]{1,64}$"
MAJOR = Field(ge=15, le=99, description="The PostgreSQL major to upgrade to.")


class UpgradeCheckBody(MemberBody):
    """POST /upgrade/check: what would keep this member from an upgrade (changes nothing)."""

    to_version: int = MAJOR
    method: str = Field("link", pattern="^(link|copy|clone|swap)$", description="pg_upgrade's method.")


class UpgradePrimaryBody(UpgradeCheckBody):
    """POST /upgrade/primary: the leader's part of the upgrade named in etcd's ``upgrade`` key."""

    id: str = Field(pattern=UPGRADE_ID, description="The upgrade (etcd's upgrade key names it).")


class UpgradeStopBody(MemberBody):
    """POST /upgrade/stop: a replica waits until it has replayed ``lsn``, then stops."""

    id: str = Field(pattern=UPGRADE_ID, description="The upgrade (etcd's upgrade key names it).")
    lsn: str = Field(
        pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", description="The old primary's last LSN."
    )
    timeout: float = Field(120.0, gt=0, le=3600, description="Seconds to wait for the replay.")


class UpgradeRejoinBody(MemberBody):
    """POST /upgrade/rejoin: a replica is cloned again from the upgraded leader."""

    id: str = Field(pattern=UPGRADE_ID, description="The upgrade (etcd's upgrade key names it).")
    to_version: int = MAJOR
