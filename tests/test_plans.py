"""The plans file: shipped defaults follow the seed; an invalid file names the file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from billing.plans import PlansFileError, load_catalog, plan_of_price
from db.enums import BillingInterval, Tier

SHIPPED = (Path(__file__).resolve().parents[1] / "billing" / "plans.toml").read_text()


def test_the_shipped_catalog_follows_the_seed() -> None:
    catalog = load_catalog()
    assert catalog.price(Tier.STARTER, BillingInterval.MONTHLY).amount == 2900
    assert catalog.price(Tier.STARTER, BillingInterval.ANNUAL).amount == 29000
    assert catalog.price(Tier.PRO, BillingInterval.MONTHLY).amount == 9900
    assert catalog.price(Tier.PRO, BillingInterval.ANNUAL).amount == 99000
    assert catalog.trial_days == 14
    assert catalog.currency == "usd"
    assert catalog.price(Tier.PRO, BillingInterval.ANNUAL).lookup_key == "pro_annual"
    assert list(catalog.plans) == [Tier.STARTER, Tier.PRO]


def test_limits_are_features_of_their_tier() -> None:
    catalog = load_catalog()
    assert catalog.limit(Tier.STARTER, "api_calls") == 10000
    assert catalog.has_feature(Tier.STARTER, "api_calls")
    assert not catalog.has_feature(Tier.STARTER, "priority_support")
    assert catalog.has_feature(Tier.PRO, "priority_support")
    assert catalog.limit(Tier.NONE, "api_calls") is None


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (lambda text: text.replace("[tiers.pro]", "[tiers.gold]"), "tiers", "unknown tier 'gold'"),
        (lambda text: text.replace("monthly = 9900, ", ""), "tiers.pro.prices", "missing price for monthly"),
        (lambda text: text.replace("monthly = 2900", "monthly = -1"), "tiers.starter.prices", "positive"),
        (lambda text: text.replace("trial_days = 14", "trial_days = -3"), "trial_days", "greater than"),
        (lambda text: text.replace('currency = "usd"', 'currency = "dollars"'), "currency", "pattern"),
        (lambda text: text + "\nsurprise = 1\n", "surprise", "unknown key"),
        (
            lambda text: text.replace('api_calls = "0.05"', 'storage_gb = "0.05"'),
            "tiers.pro.metered_prices.storage_gb",
            "not declared under [metered]",
        ),
        (
            lambda text: text.replace('"auto"   #', '"sometimes"   #'),
            "checkout.billing_address_collection",
            "auto",
        ),
    ],
)
def test_an_invalid_plans_file_names_file_key_and_problem(
    tmp_path: Path, edit: object, key: str, problem: str
) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(edit(SHIPPED))  # type: ignore[operator]
    with pytest.raises(PlansFileError) as caught:
        load_catalog(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert key in message
    assert problem in message


def test_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text("tiers = [")
    with pytest.raises(PlansFileError, match="not valid TOML"):
        load_catalog(path)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlansFileError, match="cannot read"):
        load_catalog(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"tier": "pro", "interval": "annual"}, (Tier.PRO, BillingInterval.ANNUAL)),
        ({"tier": "starter", "interval": "monthly"}, (Tier.STARTER, BillingInterval.MONTHLY)),
        ({"tier": "gold", "interval": "monthly"}, None),
        ({"tier": "none", "interval": "monthly"}, None),
        ({}, None),
    ],
)
def test_a_prices_plan_comes_from_its_metadata(metadata: dict[str, str], expected: object) -> None:
    assert plan_of_price({"id": "price_anything", "metadata": metadata}) == expected
