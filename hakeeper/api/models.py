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


class FailoverBody(_Body):
    candidate: str = Field(min_length=1, max_length=NAME_MAX, description="Member to promote.")
    force: StrictBool = Field(False, description="Promote even an ineligible candidate (may lose data).")


class RestartBody(_Body):
    member: str | None = Field(
        None, min_length=1, max_length=NAME_MAX, description="The member meant (checked against this node)."
    )
    scheduled_at: AwareDatetime | None = Field(
        None, description="Restart at this time (ISO 8601 with a timezone) instead of now."
    )
    pending: StrictBool = Field(
        False,
        description="Only if PostgreSQL has parameter changes pending a restart (checked when it runs).",
    )


class MemberBody(_Body):
    member: str | None = Field(
        None, min_length=1, max_length=NAME_MAX, description="The member meant (checked against this node)."
    )


class EmptyBody(_Body):
    """POST /reinitialize, /reload take no parameters (an empty body or ``{}``)."""
