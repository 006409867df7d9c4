"""The Grafana dashboard the chart ships (charts/visionr1-operator/dashboards/visionr1.json).

Its structure as Grafana 10 reads it, and, above all, that every series a query names is
one that is really exported: the trainer's from a real (tiny, CPU) GRPO step and SFT step
whose metrics registries are scraped, the operator's from ``OperatorMetrics`` after it
recorded one of everything. A panel that names a metric or a label nobody exports fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from visionr1_operator.api import StageStatus
from visionr1_operator.cluster.metrics import OperatorMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "visionr1-operator" / "dashboards" / "visionr1.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Prometheus adds to every series it scrapes through a PodMonitor or ServiceMonitor.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "service", "job", "instance"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__range_s"}
PROMQL_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev", "group",
    "rate", "irate", "increase", "delta", "deriv", "changes", "resets", "histogram_quantile",
    "avg_over_time", "max_over_time", "min_over_time", "last_over_time", "sum_over_time",
    "abs", "clamp", "clamp_min", "clamp_max", "absent", "scalar", "vector", "time", "timestamp",
    "sort", "sort_desc", "label_replace", "round",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}
# What the issue asks the dashboard to show, by the series that show it.
REQUIRED = {
    "visionr1_reward_mean", "visionr1_accuracy", "visionr1_format_rate", "visionr1_completion_length_mean",
    "visionr1_kl", "visionr1_rollout_tokens_per_s", "visionr1_step_seconds",
    "visionr1_operator_stage_duration_seconds_bucket", "visionr1_operator_runs",
    "visionr1_operator_reconcile_errors_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert match, var["name"]
            out.append((f"variable {var['name']}", match.group(1)))
    return out


# --- what is really exported -------------------------------------------------------------------


def exposition_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def trainer_series(tmp_path_factory) -> dict[str, set[str]]:
    """The series a GRPO stage and an SFT stage export, each run for real for one step."""
    import visionr1_trainer.metrics as stage_metrics
    from visionr1_trainer.config import GRPOStageConfig, SFTStageConfig
    from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
    from visionr1_trainer.grpo.trainer import run as run_grpo
    from visionr1_trainer.models.tiny import build_tiny_vlm
    from visionr1_trainer.runtime import reset_stop
    from visionr1_trainer.sft.train import run as run_sft

    from grpo_harness import build_warm_model, grpo_config, write_color_task

    registries = []

    class Recorded(stage_metrics.StageMetrics):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            registries.append(self.registry)

    tmp = tmp_path_factory.mktemp("exported")
    reset_stop()
    with pytest.MonkeyPatch.context() as mp:
        # run_on_ranks imports StageMetrics from the module when a stage starts.
        mp.setattr(stage_metrics, "StageMetrics", Recorded)
        grpo_model = build_warm_model(tmp / "grpo-model", steps=0)
        grpo_data = write_color_task(tmp / "grpo-data", per_color=2)
        run_grpo(GRPOStageConfig.model_validate(
            grpo_config(tmp, grpo_model, grpo_data, steps=1, rolloutBatchSize=2), by_name=False))
        sft_model = build_tiny_vlm(tmp / "sft-model", corpus=tokenizer_corpus(per_task=2))
        cold = generate(tmp / "sft-data", 4, seed=1, n_eval=1).cold_start
        run_sft(SFTStageConfig.model_validate({
            "run": "t", "stage": "sft", "outputUri": f"file://{tmp}/store/sft",
            "storage": {"uri": f"file://{tmp}/store"},
            "model": {"name": f"file://{sft_model}", "dtype": "float32"}, "metricsPort": 0,
            "data": {"source": str(cold)},
            "sft": {"epochs": 1, "learningRate": 1e-3, "cutoffLength": 256, "perDeviceBatchSize": 4,
                    "gradientAccumulationSteps": 1, "precision": "fp32", "deepspeedZeroStage": 0,
                    "saveEverySteps": 100},
        }))
    assert len(registries) == 2
    series: dict[str, set[str]] = {}
    for registry in registries:
        for name, labels in exposition_labels(generate_latest(registry).decode()).items():
            series.setdefault(name, set()).update(labels)
    return series


@pytest.fixture(scope="module")
def operator_series() -> dict[str, set[str]]:
    """The operator's series after it saw a run, a stage finish, an API call and a failed reconcile."""
    metrics = OperatorMetrics()
    metrics.observe_run(("research", "r"), "Running")
    before = [StageStatus(name="sft", kind="sft", state="Running", attempts=1)]
    after = [StageStatus(name="sft", kind="sft", state="Succeeded", attempts=1)]
    metrics.observe_stages(before, after, lambda record: 3600.0)
    metrics.api_request("create", "jobs")
    # What RunController records around each reconcile.
    metrics.reconcile_seconds.observe(0.05)
    metrics.reconcile_errors.labels(reason="ApiException").inc()
    return exposition_labels(generate_latest(metrics.registry).decode())


@pytest.fixture(scope="module")
def exported(trainer_series, operator_series) -> dict[str, set[str]]:
    assert not trainer_series.keys() & operator_series.keys()
    return {**trainer_series, **operator_series}


# --- reading PromQL ------------------------------------------------------------------------------


def check_brackets(expr: str) -> None:
    """Strings closed and (), [], {} balanced and nested."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    in_string = False
    for i, ch in enumerate(expr):
        if ch == '"' and (i == 0 or expr[i - 1] != "\\"):
            in_string = not in_string
        elif in_string:
            continue
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} at {i}: {expr}"
    assert not in_string and not stack, f"unclosed {'string' if in_string else stack}: {expr}"


def parse_promql(expr: str) -> dict[str, Any]:
    """The parts of a query this test checks.

    ``selectors``: (metric, label names its matchers use); ``grouping``: the label names
    of by/without/on/ignoring/group_left/group_right; ``functions``: what is called;
    ``bare``: any other identifier (a metric named without a matcher, or a typo).
    """
    check_brackets(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and regexes
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges: [5m], [$__rate_interval]
    grouping = set()
    for _, labels in re.findall(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    selectors = []
    for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", text):
        assert metric, f"a selector without a metric name: {expr}"
        selectors.append((metric, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    text = re.sub(r"([A-Za-z_:][\w:]*)?\s*\{[^}]*\}", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)
    functions = set(re.findall(r"([A-Za-z_][\w]*)\s*\(", text))
    text = re.sub(r"([A-Za-z_][\w]*)\s*\(", "(", text)
    bare = [word for word in re.findall(r"[A-Za-z_:][\w:]*", text) if word not in PROMQL_KEYWORDS]
    return {"selectors": selectors + [(name, set()) for name in bare], "grouping": grouping, "functions": functions}


def test_the_promql_reader_finds_metrics_labels_and_functions():
    parsed = parse_promql('histogram_quantile(0.9, sum by (le, kind) (rate(a_bucket{outcome="x"}[$__range]))) / '
                          'on(kind) group_left b + c')
    assert parsed["selectors"] == [("a_bucket", {"outcome"}), ("b", set()), ("c", set())]
    assert parsed["grouping"] == {"le", "kind"} and parsed["functions"] == {"histogram_quantile", "sum", "rate"}
    with pytest.raises(AssertionError, match="unclosed"):
        parse_promql("sum(rate(x[5m])")
    with pytest.raises(AssertionError, match="unbalanced"):
        parse_promql('sum(x{a="b")}')


# --- the tests -------------------------------------------------------------------------------------


def test_dashboard_structure(dashboard):
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"]) and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 38  # Grafana 10
    assert dashboard.get("id") is None  # provisioned dashboards get their id from Grafana
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) and v >= 0 for v in grid.values())
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        assert panel["type"] in ("timeseries", "stat", "bargauge", "table", "gauge"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "run", "stage"]
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name, depends_on in (("namespace", []), ("run", ["namespace"]), ("stage", ["namespace", "run"])):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE, name
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", name
        query = var["query"]["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})"), name
        assert re.findall(r"\$(\w+)", query) == depends_on, name
    # Every $variable a query uses exists.
    known = set(variables) | GRAFANA_VARIABLES
    for where, expr in queries(dashboard):
        for name in re.findall(r"\$\{?(\w+)\}?", expr):
            assert name in known, f"{where}: ${name}"


def test_every_metric_and_label_a_query_names_is_exported(dashboard, exported):
    used = set()
    for where, expr in queries(dashboard):
        parsed = parse_promql(expr)
        assert parsed["functions"] <= PROMQL_FUNCTIONS, f"{where}: {parsed['functions'] - PROMQL_FUNCTIONS}"
        assert parsed["selectors"], f"{where}: no metric in {expr}"
        labels_here = set(TARGET_LABELS)
        for metric, matched in parsed["selectors"]:
            assert metric.startswith("visionr1_"), f"{where}: {metric}"
            assert metric in exported, f"{where}: {metric} is not exported by the trainer or the operator"
            unknown = matched - exported[metric] - TARGET_LABELS
            assert not unknown, f"{where}: {metric} has no label {unknown}"
            labels_here |= exported[metric]
            used.add(metric)
        assert parsed["grouping"] <= labels_here, f"{where}: no series has {parsed['grouping'] - labels_here}"
    assert REQUIRED <= used, REQUIRED - used


def test_training_panels_show_each_stage(dashboard, trainer_series):
    """Reward, accuracy, format rate... per PTST stage: kept apart by the stage label, filtered by the variables."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            names = {metric for metric, _ in parse_promql(target["expr"])["selectors"]}
            if not names & trainer_series.keys():
                continue
            assert "{{stage}}" in target["legendFormat"], panel["title"]
            assert "stage" in parse_promql(target["expr"])["grouping"], panel["title"]
            for metric, matched in parse_promql(target["expr"])["selectors"]:
                assert {"namespace", "run", "stage"} <= matched, f"{panel['title']}: {metric}"
