"""Billing owners: an account belongs to a user or to an organisation.

Every service function keys accounts by one string, the *owner key* (the `user_id` column of
`billing_account`): a user's own id unchanged, so personal accounts read and answer exactly as
before, or `org:` followed by the organisation's id. The row also carries the owner's kind
(`owner_kind`, `user` by default), and a check constraint keeps kind and key in agreement. User
ids that begin with `org:` are refused at sign-in (graph/auth.py), so the two kinds never collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ORG_PREFIX = "org:"


class OwnerKind(StrEnum):
    USER = "user"
    ORGANIZATION = "organization"


@dataclass(frozen=True, slots=True)
class Owner:
    kind: OwnerKind
    id: str

    @property
    def key(self) -> str:
        return ORG_PREFIX + self.id if self.kind is OwnerKind.ORGANIZATION else self.id

    @property
    def is_organization(self) -> bool:
        return self.kind is OwnerKind.ORGANIZATION


@dataclass(frozen=True, slots=True)
class OwnerIdentity:
    """An organisation as a customer (billing.customers `Identity`): its owner key, and no email or
    name of its own (no member's token speaks for the organisation's contact details)."""

    id: str
    email: str | None = None
    name: str | None = None


def org_key(org_id: str) -> str:
    return ORG_PREFIX + org_id


def owner_of(key: str) -> Owner:
    """The owner an owner key names."""
    if key.startswith(ORG_PREFIX):
        return Owner(OwnerKind.ORGANIZATION, key[len(ORG_PREFIX) :])
    return Owner(OwnerKind.USER, key)


def owner_columns(key: str) -> dict[str, Any]:
    """The owner columns of a new `billing_account` row keyed by `key`."""
    return {"user_id": key, "owner_kind": owner_of(key).kind.value}


def customer_metadata(key: str) -> dict[str, str]:
    """The metadata that names the owner of a Stripe customer: `userId` or `orgId`."""
    owner = owner_of(key)
    return {"orgId": owner.id} if owner.is_organization else {"userId": owner.id}


def owner_key_from_metadata(values: dict[str, Any]) -> str | None:
    """The owner key a customer's (or subscription's) metadata names, if any."""
    org_id = values.get("orgId")
    if isinstance(org_id, str) and org_id:
        return org_key(org_id)
    user_id = values.get("userId")
    return user_id if isinstance(user_id, str) and user_id else None
