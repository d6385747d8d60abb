"""docs/prometheus/alerts.yml: valid rules (`promtool check rules`), each proven by
`promtool test rules` to fire on a series that should trigger it and stay quiet on one that
should not; every rule has a summary and a runbook naming a `billing` command, and every metric
it uses is one the service exports (docs/operations.md lists them)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.promtool import promtool

RULES = Path(__file__).resolve().parents[1] / "docs" / "prometheus"
EXPORTED = re.compile(r"\b(billing_[a-z_]+|up)\b")


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yml", cwd=RULES)


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    rules = (RULES / "alerts.yml").read_text()
    tests = (RULES / "alerts.test.yml").read_text()
    for alert in re.findall(r"- alert: (\w+)", rules):
        assert f"name: {alert} fires" in tests and f"name: {alert} stays quiet" in tests, alert
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml", cwd=RULES)


def test_every_rule_has_a_summary_a_runbook_command_and_known_metrics() -> None:
    text = (RULES / "alerts.yml").read_text()
    operations = (RULES.parent / "operations.md").read_text()
    blocks = text.split("- alert: ")[1:]
    assert len(blocks) == 9
    for block in blocks:
        name = block.split()[0]
        assert "summary: " in block, name
        runbook = next(line for line in block.splitlines() if "runbook: " in line)
        assert "`billing " in runbook, name
        assert f"`{name}`" in operations, f"{name} is not explained in docs/operations.md"
        expr = block.split("expr:", 1)[1].split("labels:", 1)[0]
        for metric in EXPORTED.findall(expr):
            if metric != "up":
                assert f"`{metric.removesuffix('_total')}" in operations, metric
