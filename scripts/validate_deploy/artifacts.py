"""Deploy artifacts besides the manifests: the Dockerfile's fixed invariants, the Grafana
dashboard (schema, datasource variable, every SPEC metric queried, latency quantiles) and
the Prometheus alert rules (expected alerts, severity, annotations, runbooks)."""

import json
import re

from .common import Failed, display, duration_seconds, load_yaml

DOCKERFILE_INVARIANTS = {
    "builder stage rust:1-bookworm": r"(FROM|ARG RUST_IMAGE=)\s*rust:1-bookworm",
    "runtime stage debian:bookworm-slim": r"(FROM|ARG RUNTIME_IMAGE=)\s*debian:bookworm-slim",
    "cargo build --release --locked --bin outbox-relay": r"cargo build --release --locked --bin outbox-relay(\s|$)",
    "ca-certificates and libssl3 in the runtime": r"apt-get install[^\n]*ca-certificates[^\n]*libssl3",
    "USER 10001": r"^USER 10001\s*$",
    "EXPOSE 9187": r"^EXPOSE 9187\s*$",
    "ENTRYPOINT": r'^ENTRYPOINT \["/usr/local/bin/outbox-relay"\]\s*$',
    "CMD": r'^CMD \["run", "--config", "/etc/outbox-relay/config.toml"\]\s*$',
}

SPEC_METRICS = [
    "outbox_relay_published_total", "outbox_relay_failed_total", "outbox_relay_retries_total",
    "outbox_relay_pending_rows", "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_publish_latency_seconds", "outbox_relay_broker_up", "outbox_relay_database_up",
]

EXPECTED_ALERTS = ["OutboxOldestPendingAgeHigh", "OutboxRowsFailed", "OutboxRelayNotReady",
                   "OutboxBrokerDown", "OutboxDatabaseDown"]


def check_dockerfile(report, path):
    with open(path) as f:
        joined = re.sub(r"\\\n\s*", " ", f.read())
    for what, rx in DOCKERFILE_INVARIANTS.items():
        if not re.search(rx, joined, re.M):
            report.err(display(path), f"missing: {what}")
    return "Dockerfile invariants OK"


def balanced(expr):
    """Brackets balanced and quotes closed (a cheap PromQL sanity check)."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack, in_str = [], None
    for ch in expr:
        if in_str:
            if ch == in_str:
                in_str = None
            continue
        if ch in "\"'`":
            in_str = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not in_str


def _panels(ps, out):
    for p in ps:
        out.append(p)
        _panels(p.get("panels") or [], out)
    return out


def check_grafana(report, path):
    where = display(path)
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise Failed(f"{where}: not valid JSON: {e}") from e
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        report.err(where, f"schemaVersion {dash.get('schemaVersion')} (want >= 36)")
    for k in ("title", "uid", "panels", "templating"):
        if k not in dash:
            report.err(where, f"missing {k}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource") or {}
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        report.err(where, "template variable `datasource` (type datasource, query prometheus) missing")
    panels = _panels(dash.get("panels") or [], [])
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        report.err(where, "panel ids are not unique")
    exprs = []
    for p in (p for p in panels if p.get("type") != "row"):
        title = p.get("title")
        if not all(k in (p.get("gridPos") or {}) for k in ("h", "w", "x", "y")):
            report.err(where, f"panel {title!r}: gridPos incomplete")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            report.err(where, f"panel {title!r}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            report.err(where, f"panel {title!r}: no targets")
        for t in p.get("targets") or []:
            e = t.get("expr", "")
            if not balanced(e):
                report.err(where, f"panel {title!r}: unbalanced expression {e!r}")
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                report.err(where, f"panel {title!r}: target datasource is not ${{datasource}}")
            exprs.append(e)
    alltext = "\n".join(exprs)
    for m in SPEC_METRICS:
        if m not in alltext:
            report.err(where, f"no panel queries {m}")
    for q in ("0.5", "0.99"):
        rx = r"histogram_quantile\(\s*" + re.escape(q) + r"0*\s*,[^\n]*outbox_relay_publish_latency_seconds_bucket"
        if not re.search(rx, alltext):
            report.err(where, f"no histogram_quantile({q}, ..._bucket) latency query")
    return f"grafana dashboard OK ({len(panels)} panels, {len(exprs)} queries)"


def check_rule(report, where, r):
    expr = r.get("expr")
    if not isinstance(expr, str) or not expr.strip():
        report.err(where, "no expr")
    elif not balanced(expr):
        report.err(where, f"unbalanced expr {expr!r}")
    if "for" in r and duration_seconds(r["for"]) is None:
        report.err(where, f"bad for: {r['for']!r}")
    if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
        report.err(where, "labels.severity must be critical, warning or info")
    ann = r.get("annotations") or {}
    for k in ("summary", "description"):
        if not ann.get(k):
            report.err(where, f"annotations.{k} missing")
    if not (ann.get("runbook") or ann.get("runbook_url")):
        report.err(where, "no runbook / runbook_url annotation")


def check_alerts(report, path):
    where = display(path)
    groups = (load_yaml(path) or {}).get("groups")
    if not isinstance(groups, list) or not groups:
        report.err(where, "no groups")
        return "alert rules: no groups"
    names = []
    for g in groups:
        if not g.get("name"):
            report.err(where, "group without name")
        for r in g.get("rules") or []:
            if r.get("alert"):
                names.append(r["alert"])
                check_rule(report, f"{where} alert {r['alert']}", r)
    for a in EXPECTED_ALERTS:
        if a not in names:
            report.err(where, f"alert {a} missing")
    if len(names) != len(set(names)):
        report.err(where, "duplicate alert names")
    return f"alert rules OK ({len(names)} alerts: {', '.join(names)})"
