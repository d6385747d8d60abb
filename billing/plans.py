"""The plan catalog: tiers, prices, trial, features, limits and metered features.

Read from a TOML file (the shipped `billing/plans.toml`, or `BILLING_PLANS_FILE`). Tiers are
the public enum's `starter` < `pro`. A price's tier is always read from its Stripe metadata
(`metadata.tier`, `metadata.interval`), never from a table of price ids: an archived price that
existing subscribers still pay keeps its tier. Lookup keys only choose which price a new
checkout or plan change uses.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from db.enums import BillingInterval, Tier

DEFAULT_PLANS_FILE = Path(__file__).with_name("plans.toml")
TIER_RANK = {Tier.NONE: 0, Tier.STARTER: 1, Tier.PRO: 2}
PAID_TIERS = (Tier.STARTER, Tier.PRO)
STRIPE_INTERVAL = {BillingInterval.MONTHLY: "month", BillingInterval.ANNUAL: "year"}


class PlansFileError(ValueError):
    """The plans file is invalid: the message names the file, the key and the problem."""


def tier_rank(tier: Tier) -> int:
    return TIER_RANK[tier]


# The file's schema ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Checkout(_Strict):
    automatic_tax: bool = False
    billing_address_collection: Literal["auto", "required"] = "auto"


class _CustomField(_Strict):
    name: str = Field(min_length=1, max_length=40)
    value: str = Field(min_length=1, max_length=140)


class _Invoice(_Strict):
    footer: str | None = Field(default=None, max_length=5000)
    custom_fields: list[_CustomField] = Field(default_factory=list, max_length=4)


class _Metered(_Strict):
    display_name: str = Field(min_length=1)
    event_name: str = Field(pattern=r"^[a-zA-Z0-9_]{1,100}$")


class _Tier(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    features: list[str] = Field(default_factory=list)
    prices: dict[BillingInterval, int]
    limits: dict[str, int] = Field(default_factory=dict)
    metered_prices: dict[str, str] = Field(default_factory=dict)
    # Priced per seat: the licensed price's quantity is the organisation's seat count.
    per_seat: bool = False
    min_seats: int | None = Field(default=None, ge=1)
    max_seats: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _seat_bounds(self) -> _Tier:
        if not self.per_seat and (self.min_seats is not None or self.max_seats is not None):
            raise ValueError("min_seats and max_seats need per_seat = true")
        if self.min_seats is not None and self.max_seats is not None and self.min_seats > self.max_seats:
            raise ValueError("min_seats is above max_seats")
        return self

    @field_validator("prices")
    @classmethod
    def _both_intervals(cls, prices: dict[BillingInterval, int]) -> dict[BillingInterval, int]:
        missing = [interval.value for interval in BillingInterval if interval not in prices]
        if missing:
            raise ValueError(f"missing price for {', '.join(missing)}")
        if any(amount <= 0 for amount in prices.values()):
            raise ValueError("prices must be positive amounts in cents")
        return prices

    @field_validator("limits")
    @classmethod
    def _non_negative(cls, limits: dict[str, int]) -> dict[str, int]:
        if any(limit < 0 for limit in limits.values()):
            raise ValueError("limits must be zero or more")
        return limits

    @field_validator("metered_prices")
    @classmethod
    def _decimal_prices(cls, prices: dict[str, str]) -> dict[str, str]:
        for feature, value in prices.items():
            try:
                amount = Decimal(value)
            except InvalidOperation:
                raise ValueError(f"{feature}: {value!r} is not a decimal amount in cents") from None
            if amount <= 0:
                raise ValueError(f"{feature}: must be positive")
        return prices


class _PlansFile(_Strict):
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    trial_days: int = Field(default=14, ge=0, le=730)
    checkout: _Checkout = _Checkout()
    invoice: _Invoice = _Invoice()
    metered: dict[str, _Metered] = Field(default_factory=dict)
    tiers: dict[str, _Tier]

    @field_validator("tiers")
    @classmethod
    def _the_two_tiers(cls, tiers: dict[str, _Tier]) -> dict[str, _Tier]:
        known = {tier.value for tier in PAID_TIERS}
        for name in tiers:
            if name not in known:
                raise ValueError(f"unknown tier {name!r} (tiers are {', '.join(sorted(known))})")
        missing = known - set(tiers)
        if missing:
            raise ValueError(f"missing tier {', '.join(sorted(missing))}")
        return tiers

    @model_validator(mode="after")
    def _metered_features_are_declared(self) -> _PlansFile:
        for tier_name, tier in self.tiers.items():
            for feature in tier.metered_prices:
                if feature not in self.metered:
                    raise ValueError(
                        f"tiers.{tier_name}.metered_prices.{feature}: not declared under [metered]"
                    )
        return self


# The catalog the rest of the code uses -------------------------------------------------------


@dataclass(frozen=True)
class Price:
    tier: Tier
    interval: BillingInterval
    amount: int  # smallest currency unit (per seat when `per_seat`)
    currency: str
    per_seat: bool = False  # licensed per seat: the subscription item's quantity is the seat count

    @property
    def lookup_key(self) -> str:
        return f"{self.tier.value}_{self.interval.value}"


@dataclass(frozen=True)
class MeteredPrice:
    tier: Tier
    feature: str
    unit_amount_decimal: str
    currency: str

    @property
    def lookup_key(self) -> str:
        return f"{self.tier.value}_{self.feature}_metered"


@dataclass(frozen=True)
class Meter:
    feature: str
    display_name: str
    event_name: str


@dataclass(frozen=True)
class Plan:
    tier: Tier
    name: str
    description: str | None
    prices: Mapping[BillingInterval, Price]
    features: frozenset[str]  # every feature of the tier, limited ones included
    limits: Mapping[str, int]  # per month
    metered_prices: Mapping[str, MeteredPrice]
    per_seat: bool = False
    min_seats: int = 1
    max_seats: int | None = None

    def seats_allowed(self, seats: int) -> bool:
        return self.min_seats <= seats and (self.max_seats is None or seats <= self.max_seats)


@dataclass(frozen=True)
class CheckoutOptions:
    automatic_tax: bool
    billing_address_collection: str


@dataclass(frozen=True)
class InvoiceOptions:
    footer: str | None
    custom_fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Catalog:
    currency: str
    trial_days: int
    plans: Mapping[Tier, Plan]
    meters: Mapping[str, Meter]
    checkout: CheckoutOptions
    invoice: InvoiceOptions

    def plan(self, tier: Tier) -> Plan:
        try:
            return self.plans[tier]
        except KeyError:
            raise KeyError(f"no plan for tier {tier.value}") from None

    def price(self, tier: Tier, interval: BillingInterval) -> Price:
        return self.plan(tier).prices[interval]

    @cached_property
    def all_features(self) -> frozenset[str]:
        return frozenset(feature for plan in self.plans.values() for feature in plan.features)

    def limit(self, tier: Tier, feature: str) -> int | None:
        """The monthly limit of `feature` on `tier`; None when unlimited or not in the tier."""
        plan = self.plans.get(tier)
        return None if plan is None else plan.limits.get(feature)

    def has_feature(self, tier: Tier, feature: str) -> bool:
        plan = self.plans.get(tier)
        return plan is not None and feature in plan.features


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or DEFAULT_PLANS_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlansFileError(f"{path}: cannot read the plans file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlansFileError(f"{path}: not valid TOML ({exc})") from None
    try:
        parsed = _PlansFile.model_validate(raw)
    except ValidationError as exc:
        raise PlansFileError(f"{path}: {_describe(exc)}") from None
    return _catalog(parsed)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{key}: {message}")
    return "; ".join(problems)


def _catalog(parsed: _PlansFile) -> Catalog:
    plans: dict[Tier, Plan] = {}
    for name, tier_file in parsed.tiers.items():
        tier = Tier(name)
        plans[tier] = Plan(
            tier=tier,
            name=tier_file.name,
            description=tier_file.description,
            prices={
                interval: Price(tier, interval, amount, parsed.currency, tier_file.per_seat)
                for interval, amount in sorted(tier_file.prices.items())
            },
            features=frozenset(tier_file.features) | frozenset(tier_file.limits),
            limits=dict(tier_file.limits),
            metered_prices={
                feature: MeteredPrice(tier, feature, amount, parsed.currency)
                for feature, amount in tier_file.metered_prices.items()
            },
            per_seat=tier_file.per_seat,
            min_seats=tier_file.min_seats or 1,
            max_seats=tier_file.max_seats,
        )
    return Catalog(
        currency=parsed.currency,
        trial_days=parsed.trial_days,
        plans=dict(sorted(plans.items(), key=lambda item: tier_rank(item[0]))),
        meters={
            feature: Meter(feature, metered.display_name, metered.event_name)
            for feature, metered in parsed.metered.items()
        },
        checkout=CheckoutOptions(parsed.checkout.automatic_tax, parsed.checkout.billing_address_collection),
        invoice=InvoiceOptions(
            parsed.invoice.footer,
            tuple((field.name, field.value) for field in parsed.invoice.custom_fields),
        ),
    )


def plan_of_price(price: Any) -> tuple[Tier, BillingInterval] | None:
    """The tier and interval a Stripe price stands for, from its metadata (archived prices too)."""
    metadata = _get(price, "metadata") or {}
    try:
        tier = Tier(_get(metadata, "tier"))
        interval = BillingInterval(_get(metadata, "interval"))
    except ValueError:
        return None
    if tier is Tier.NONE:
        return None
    return tier, interval


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)
