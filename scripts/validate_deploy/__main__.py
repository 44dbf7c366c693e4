"""python3 -m validate_deploy COMMAND: one step of scripts/validate-deploy.sh. Prints what
it checked; errors go to stderr as `  error: where: what`; exit 1 if there were any, or
if a check could not run (a file that does not parse, a missing tool)."""

import argparse
import os
import sys
import tempfile

from . import artifacts, k8s, policy, relay_config
from .common import ROOT, Failed, Report, load_objects

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-relay-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"


def versions():
    v = os.environ.get("K8S_VERSIONS", "1.29.0 1.33.0").split()
    if not v:
        raise Failed("K8S_VERSIONS is empty")
    return v


def cmd_count(report, args):
    print(k8s.count_objects(k8s.manifests()))
    return None


def cmd_overlays(report, args):
    """Render each overlay, then schemas, policy and config on what it renders."""
    with tempfile.TemporaryDirectory() as work:
        rendered = k8s.render_overlays(report, work)
        for name, path in rendered:
            label = f"overlay {name} (rendered)"
            k8s.check_schemas(report, label, [path], versions())
            objs = [(label, o) for _, o in load_objects([path])]
            print(f"{label}: {policy.check_policy(report, objs)}")
            print(relay_config.check_config(report, args.relay, objs, work, label=f"overlay {name}"))
    return f"{len(rendered)} overlays rendered and checked"


COMMANDS = {
    "count": (cmd_count, "print how many objects the source manifests hold"),
    "layout": (lambda r, a: k8s.check_layout(r), "kustomize layout: references exist, no stray manifests"),
    "schemas": (lambda r, a: k8s.check_schemas(r, "manifests", k8s.manifests(), versions()),
                "kubernetes-validate --strict for each of K8S_VERSIONS"),
    "policy": (lambda r, a: policy.check_policy(r, load_objects(k8s.manifests())), "relay workload policy"),
    "config": (lambda r, a: _config(r, a), "the ConfigMap's config.toml through `outbox-relay check --offline`"),
    "overlays": (cmd_overlays, "`kubectl kustomize` each overlay; schemas, policy, config on the result"),
    "dockerfile": (lambda r, a: artifacts.check_dockerfile(r, DOCKERFILE), "Dockerfile invariants"),
    "grafana": (lambda r, a: artifacts.check_grafana(r, DASHBOARD), "the Grafana dashboard"),
    "alerts": (lambda r, a: artifacts.check_alerts(r, ALERTS), "the Prometheus alert rules"),
}


def _config(report, args):
    with tempfile.TemporaryDirectory() as work:
        return relay_config.check_config(report, args.relay, load_objects(k8s.manifests()), work)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m validate_deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name in ("config", "overlays"):
            p.add_argument("--relay", required=True, help="the outbox-relay binary")
    args = parser.parse_args(argv)
    report = Report()
    try:
        ok = COMMANDS[args.command][0](report, args)
    except Failed as e:
        report.err(args.command, str(e))
        ok = None
    if ok is None and not report.errors:
        return 0
    return report.finish(ok)


if __name__ == "__main__":
    sys.exit(main())
