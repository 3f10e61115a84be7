"""The Grafana dashboard and the Prometheus rules use only what the agent exports.

A real agent (a Pipeline against FakeACServer and FakeTarget, with its health
listener on 127.0.0.1) runs a few tasks, one of them cut off by the response
cap so that a failure reason exists, and its ``/metrics`` is scraped. Every
metric name and label in every PromQL expression of ``deploy/grafana`` and
``deploy/prometheus`` must be in that scrape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import requests
import yaml
from helpers import ROOT, WAIT, make_config, make_pipeline, running
from prometheus_client.parser import text_string_to_metric_families

from acagent.testing import FakeACServer, FakeTarget

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "acagent.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"

#: labels Prometheus adds to every series it scrapes (they are not in /metrics)
TARGET_LABELS = frozenset({"instance", "job"})

#: PromQL words that are neither metrics nor labels
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "bool", "offset", "inf", "nan"}
)
_GRAFANA_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")


@dataclass
class Names:
    """What one PromQL expression refers to."""

    metrics: Set[str] = field(default_factory=set)
    #: (metric or "" for a bare selector, label) from ``{label="..."}``
    selector_labels: Set[Tuple[str, str]] = field(default_factory=set)
    #: labels of ``by``/``without``/``on``/``ignoring``/``group_*`` clauses
    grouping_labels: Set[str] = field(default_factory=set)


def promql_names(expr: str) -> Names:
    """Metric names and label names of a PromQL expression (Grafana variables allowed).

    Small on purpose: string literals only occur inside selectors, ranges and
    Grafana variables are dropped, an identifier followed by ``(`` is a
    function or an aggregation, any other identifier (not a keyword) a metric.
    """
    names = Names()
    for metric, label in _GRAFANA_LABEL_VALUES.findall(expr):
        names.metrics.add(metric)
        names.selector_labels.add((metric, label))
    expr = _GRAFANA_LABEL_VALUES.sub(" 0 ", expr)
    expr = _RANGE.sub(" ", expr)
    for metric, matchers in _SELECTOR.findall(expr):
        leftover = _MATCHER.sub("", matchers).replace(",", "").strip()
        assert not leftover, f"cannot read the selector {{{matchers}}}"
        names.selector_labels |= {(metric, label) for label in _MATCHER.findall(matchers)}
    expr = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    expr = _VARIABLE.sub(" 0 ", expr)
    for labels in _GROUPING.findall(expr):
        names.grouping_labels |= {label.strip() for label in labels.split(",") if label.strip()}
    expr = _GROUPING.sub(" ", expr)
    for word, call in _IDENTIFIER.findall(expr):
        if not call and word.lower() not in _KEYWORDS:
            names.metrics.add(word)
    names.metrics |= {m for m, _ in names.selector_labels if m}
    return names


@pytest.mark.parametrize(
    "expr, metrics, selector_labels, grouping",
    [
        (
            'sum by (outcome) (rate(acagent_tasks_processed_total{instance=~"$instance"}[$__rate_interval])) * 60',
            {"acagent_tasks_processed_total"},
            {("acagent_tasks_processed_total", "instance")},
            {"outcome"},
        ),
        (
            "histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket[5m])))",
            {"x_seconds_bucket"}, set(), {"le"},
        ),
        ("a / b > 0.05", {"a", "b"}, set(), set()),
        ("m offset 5m", {"m"}, set(), set()),
        ("vector($threshold)", set(), set(), set()),
        ("sum without(a,b)(m2)", {"m2"}, set(), {"a", "b"}),
        (
            'count by (instance, job) (up_total) unless on (instance, job) '
            'sum by (instance, job) (increase(req_total{endpoint!="s3", status=~"2.."}[5m])) > 0',
            {"up_total", "req_total"},
            {("req_total", "endpoint"), ("req_total", "status")},
            {"instance", "job"},
        ),
        ('{status="429"}', set(), {("", "status")}, set()),
        ("label_values(acagent_build_info, instance)", {"acagent_build_info"},
         {("acagent_build_info", "instance")}, set()),
        ("1e3 * deriv(m3[15m])", {"m3"}, set(), set()),
    ],
)
def test_the_extractor_finds_every_metric_and_label(
    expr: str, metrics: Set[str], selector_labels: Set[Tuple[str, str]], grouping: Set[str]
) -> None:
    names = promql_names(expr)
    assert names.metrics == metrics
    assert names.selector_labels == selector_labels
    assert names.grouping_labels == grouping


# -- the expressions of the files ----------------------------------------------
def _panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> List[Tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard: panel targets and variables."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def rule_expressions() -> List[Tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# -- the scrape of a real agent -------------------------------------------------
Scrape = Dict[str, Set[str]]  # sample name -> the label names it has


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    spool = tmp_path_factory.mktemp("dashboards") / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        sizes = {"d-ok-1": 100, "d-ok-2": 2_000, "d-empty": 0, "d-too-large": 10_000}
        for task_id, size in sizes.items():
            ac.add_task({"taskId": task_id, "method": "GET", "url": f"{target.url}/bytes/{size}?seed=1"})
        config = make_config(ac.url, spool, health_addr="127.0.0.1:0", max_response_bytes=4096)
        with running(make_pipeline(config)) as pipeline:
            assert ac.wait_for_results(len(sizes), timeout=WAIT), ac.results
            assert pipeline.health is not None
            reply = requests.get(pipeline.health.url + "/metrics", timeout=10)
    assert reply.status_code == 200
    samples: Scrape = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    # the run has what the files look at: a failure reason, exchanges by status
    assert 'acagent_tasks_failed_total{reason="too_large"} 1.0' in reply.text, reply.text
    assert 'status="200"' in reply.text
    return samples


def unknown_names(expr: str, scrape: Scrape) -> List[str]:
    """The metrics and labels of ``expr`` that ``scrape`` does not have."""
    names = promql_names(expr)
    problems = [f"metric {m}" for m in sorted(names.metrics) if m not in scrape]
    for metric, label in sorted(names.selector_labels):
        have = scrape.get(metric, set()) if metric else set().union(*scrape.values())
        if label not in have | TARGET_LABELS:
            problems.append(f"label {label} of {metric or 'any metric'}")
    labels_of_expr = set().union(*(scrape.get(m, set()) for m in names.metrics)) | TARGET_LABELS
    problems += [f"label {label} (grouping)" for label in sorted(names.grouping_labels - labels_of_expr)]
    return problems


def test_a_name_the_agent_does_not_export_is_caught(scrape: Scrape) -> None:
    assert unknown_names("rate(acagent_tasks_processed_total[5m])", scrape) == []
    assert unknown_names("rate(acagent_tasks_procesed_total[5m])", scrape) == [
        "metric acagent_tasks_procesed_total"
    ]
    assert unknown_names('acagent_spool_size{reason="x"}', scrape) == ["label reason of acagent_spool_size"]
    assert unknown_names("sum by (outcome) (acagent_spool_size)", scrape) == ["label outcome (grouping)"]
    # a histogram is scraped as _bucket/_sum/_count series, never under its bare name
    assert unknown_names("acagent_upload_seconds", scrape) == ["metric acagent_upload_seconds"]
    assert unknown_names("sum by (le) (acagent_upload_seconds_bucket)", scrape) == []


@pytest.mark.parametrize(
    "where, expr", dashboard_expressions() + rule_expressions(), ids=lambda v: str(v)[:60]
)
def test_every_expression_uses_metrics_and_labels_the_agent_exports(
    where: str, expr: str, scrape: Scrape
) -> None:
    # only a line drawn at a dashboard variable may use no metric
    assert promql_names(expr).metrics or re.fullmatch(r"vector\(\$\w+\)", expr), where
    assert unknown_names(expr, scrape) == [], f"{where}: {expr}"


def test_the_dashboard_shows_every_metric_of_the_agent(scrape: Scrape) -> None:
    used = set().union(*(promql_names(e).metrics for _, e in dashboard_expressions()))
    families = {
        re.sub(r"_(total|bucket|sum|count|created|info)$", "", name)
        for name in scrape
        if name.startswith("acagent_")
    }
    shown = {re.sub(r"_(total|bucket|sum|count|created|info)$", "", name) for name in used}
    assert families - shown == set(), "add a panel for these"


# -- the files' own shape -----------------------------------------------------
def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "threshold" not in variables, "the agent exports its threshold"
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], panel["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("outcome", "in flight", "queue", "retried", "429", "spool", "executor", "ready"):
        assert topic in titles, topic


_DURATION = re.compile(r"\d+[smhd]")


def test_the_rules_are_prometheus_alerting_rules() -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    alerts = {}
    for group in rules["groups"]:
        assert group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert _DURATION.fullmatch(str(rule.get("for", "0s"))), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            # balanced, and a comparison or set operator: an alert fires on a condition
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert re.search(r"[<>]|==|!=|\bunless\b|\band\b", rule["expr"]), rule["alert"]
            alerts[rule["alert"]] = rule
    assert set(alerts) == {
        "AcagentNotReady",
        "AcagentNoSuccessfulExchange",
        "AcagentApiKeyRefused",
        "AcagentSpoolUnwritable",
        "AcagentResultsPiling",
        "AcagentAc429RateHigh",
    }
