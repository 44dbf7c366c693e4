"""The rules every relay workload follows: probes, resources, securityContext, the config
and Secret mounts, credentials only as `*_URL_FILE`, the grace period above
relay.shutdown_timeout, no service-account token, selectors that match; and the
ConfigMap's policy (no URL in config.toml, kafka.properties values as strings). Whether
config.toml is a valid relay config at all is the relay's own verdict (relay_config)."""

import os
import re
import tomllib

from .common import duration_seconds

CONFIG_MAP = "outbox-relay-config"
RELAY_CONFIG_PATH = "/etc/outbox-relay/config.toml"
SECRET_DIR = "/var/run/secrets/outbox-relay"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def pod_spec_of(obj):
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
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


def relay_containers(obj):
    """(is init container, container) for every relay container of a workload."""
    pod = pod_spec_of(obj)
    both = [(True, c) for c in pod.get("initContainers") or []] + [(False, c) for c in pod.get("containers") or []]
    return [(init, c) for init, c in both if is_relay(c)]


def workloads(objs):
    """(where, object, name) of every workload object."""
    return [(w, o, f"{w} {o['kind']}/{(o.get('metadata') or {}).get('name')}") for w, o in objs if o.get("kind") in WORKLOADS]


def config_maps(objs):
    return [(w, o) for w, o in objs if o.get("kind") == "ConfigMap" and (o.get("metadata") or {}).get("name") == CONFIG_MAP]


def selector_matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_config_map(report, where, cm):
    """The deploy policy for config.toml; relay.shutdown_timeout in seconds (or None)."""
    data = (cm.get("data") or {}).get("config.toml")
    if not isinstance(data, str):
        report.err(where, f"ConfigMap {CONFIG_MAP} has no config.toml")
        return None
    try:
        conf = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        report.err(where, f"config.toml is not valid TOML: {e}")
        return None
    props = (conf.get("kafka") or {}).get("properties") or {}
    for k, v in props.items():
        if not isinstance(v, str):
            report.err(where, f'config.toml: kafka.properties.{k} is not a string (quote dotted librdkafka keys: "{k}.…" = "…")')
    for section in ("database", "rabbitmq"):
        if "url" in (conf.get(section) or {}):
            report.err(where, f"config.toml sets {section}.url: credentials belong in the Secret (url_file)")
    shutdown = duration_seconds((conf.get("relay") or {}).get("shutdown_timeout", "20s"))
    if shutdown is None:
        report.err(where, 'relay.shutdown_timeout is not a duration like "20s"')
    return shutdown


def check_probe(report, where, c, probe, path):
    p = c.get(probe)
    if not p:
        report.err(where, f"{probe} missing")
        return
    g = p.get("httpGet") or {}
    if g.get("path") != path or g.get("port") not in ("http", 9187):
        report.err(where, f"{probe} must be GET {path} on port http, got {g}")


def check_security(report, where, c, pod):
    sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        report.err(where, "runAsNonRoot is not true")
    if sc.get("readOnlyRootFilesystem") is not True:
        report.err(where, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        report.err(where, "allowPrivilegeEscalation is not false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        report.err(where, "capabilities.drop does not contain ALL")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        report.err(where, "seccompProfile is not RuntimeDefault")
    if sc.get("privileged"):
        report.err(where, "privileged container")
    res = c.get("resources") or {}
    for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
        for k in keys:
            if k not in (res.get(part) or {}):
                report.err(where, f"resources.{part}.{k} missing")


def check_mounts(report, where, c, is_job, volumes):
    """Credentials as files from the Secret volume, config.toml from the ConfigMap."""
    env = {e.get("name"): e for e in c.get("env") or []}
    if (env.get("RUST_LOG") or {}).get("value") is None:
        report.err(where, "RUST_LOG not set")
    for k in env:
        if k and k.startswith("OUTBOX_RELAY__") and k.endswith("__URL"):
            report.err(where, f"{k} passes a credential in plain env; use {k}_FILE with the Secret volume")
    wanted = ["OUTBOX_RELAY__DATABASE__URL_FILE"] + ([] if is_job else ["OUTBOX_RELAY__RABBITMQ__URL_FILE"])
    mounts = {m.get("mountPath", "").rstrip("/"): m for m in c.get("volumeMounts") or []}
    secret_mount = mounts.get(SECRET_DIR)
    secret_vol = (volumes.get(secret_mount.get("name")) if secret_mount else None) or {}
    if not secret_mount or "secret" not in secret_vol:
        report.err(where, f"no Secret volume mounted at {SECRET_DIR}")
    elif not secret_mount.get("readOnly"):
        report.err(where, f"{SECRET_DIR} mount is not readOnly")
    secret_items = {i.get("path") for i in (secret_vol.get("secret") or {}).get("items") or []}
    for name in wanted:
        value = (env.get(name) or {}).get("value")
        if not value:
            report.err(where, f"env {name} missing")
            continue
        if os.path.dirname(value) != SECRET_DIR:
            report.err(where, f"env {name}={value} is not under {SECRET_DIR}")
        if secret_items and os.path.basename(value) not in secret_items:
            report.err(where, f"env {name}={value}: no such item in the Secret volume")
    cfg_dir = os.path.dirname(RELAY_CONFIG_PATH)
    cfg_mount = mounts.get(cfg_dir)
    cm = ((volumes.get(cfg_mount.get("name")) if cfg_mount else None) or {}).get("configMap") or {}
    if cm.get("name") != CONFIG_MAP:
        report.err(where, f"ConfigMap {CONFIG_MAP} is not mounted at {cfg_dir}")
    elif cm.get("items") and "config.toml" not in {i.get("path") for i in cm["items"]}:
        report.err(where, "config volume does not project config.toml")


def check_relay_container(report, where, c, pod, init, is_job, volumes):
    check_security(report, where, c, pod)
    args = c.get("args") or []
    if "--config" not in args or RELAY_CONFIG_PATH not in args:
        report.err(where, f"args must pass --config {RELAY_CONFIG_PATH}")
    check_mounts(report, where, c, is_job, volumes)
    if is_job:
        for probe in ("livenessProbe", "readinessProbe"):
            if c.get(probe):
                report.err(where, f"{probe} on a run-to-completion Job container (migrate serves no HTTP)")
        return
    check_probe(report, where, c, "livenessProbe", "/livez")
    check_probe(report, where, c, "readinessProbe", "/readyz")
    ports = {p.get("name"): p for p in c.get("ports") or []}
    if (ports.get("http") or {}).get("containerPort") != 9187:
        report.err(where, "container port named http (9187) missing")
    if init and c.get("restartPolicy") != "Always":
        report.err(where, "relay in initContainers without restartPolicy: Always would block the pod")


def check_others(report, objs, loads, long_running):
    """The metrics Service, PodDisruptionBudgets and the credentials Secret template."""
    for where, o in objs:
        kind, meta, spec = o.get("kind"), o.get("metadata") or {}, o.get("spec") or {}
        if kind == "Service" and meta.get("name") == "outbox-relay-metrics" and long_running:
            sel = spec.get("selector") or {}
            for name, w in long_running:
                if not selector_matches(sel, pod_labels_of(w)):
                    report.err(f"{where} Service/outbox-relay-metrics", f"selector {sel} does not select {name}")
        if kind == "PodDisruptionBudget":
            sel = (spec.get("selector") or {}).get("matchLabels") or {}
            if not any(selector_matches(sel, pod_labels_of(w)) for _, w, _ in loads):
                report.err(f"{where} PodDisruptionBudget/{meta.get('name')}", "selects no workload")
        if kind == "Secret" and meta.get("name") == "outbox-relay-credentials":
            data = {**(o.get("data") or {}), **(o.get("stringData") or {})}
            for k in ("database-url", "rabbitmq-url"):
                if k not in data:
                    report.err(f"{where} Secret/outbox-relay-credentials", f"key {k} missing")


def check_policy(report, objs):
    shutdown = None
    for where, cm in config_maps(objs):
        shutdown = check_config_map(report, where, cm)
    loads, relays, long_running = workloads(objs), 0, []
    for _, o, name in loads:
        pod, is_job = pod_spec_of(o), o["kind"] in ("Job", "CronJob")
        if o["kind"] not in ("Pod", "CronJob", "Job"):
            sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not selector_matches(sel, pod_labels_of(o)):
                report.err(name, "spec.selector.matchLabels does not match the pod template labels")
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        found = relay_containers(o)
        if not found:
            report.err(name, "has no outbox-relay container")
            continue
        for init, c in found:
            check_relay_container(report, f"{name} container {c.get('name')}", c, pod, init, is_job, volumes)
        relays += len(found)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if shutdown is not None and not grace > shutdown:
            report.err(name, f"terminationGracePeriodSeconds {grace} is not above relay.shutdown_timeout ({shutdown:g}s)")
        if pod.get("automountServiceAccountToken") is not False:
            report.err(name, "automountServiceAccountToken should be false (the relay needs no API access)")
        if not is_job:
            long_running.append((name, o))
    check_others(report, objs, loads, long_running)
    return f"policy OK ({len(objs)} objects, {relays} relay containers)"
