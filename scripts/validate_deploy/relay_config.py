"""The relay's own verdict on the deploy config: config.toml from the outbox-relay-config
ConfigMap (read with PyYAML) through `outbox-relay check --offline`, the loader and
validation `run` uses, so every key it rejects is named as the pod would name it. Run
on the ConfigMap alone, then with each relay container's OUTBOX_RELAY__* env as the pod
sets it. Secret files that exist only in the pod come back listed as unchecked."""

import os
import subprocess

from .common import Failed
from .policy import CONFIG_MAP, config_maps, relay_containers, workloads

ENV_PREFIX = "OUTBOX_RELAY__"


def container_env(report, name, c):
    """The container's literal OUTBOX_RELAY__* env; a `valueFrom` one is reported."""
    env = {}
    for e in c.get("env") or []:
        n = e.get("name") or ""
        if not n.startswith(ENV_PREFIX):
            continue
        if "value" in e:
            env[n] = str(e["value"])
        else:
            print(f"  {name}: {n} is set with valueFrom: its value is not checked offline")
    return env


def run_check(relay_bin, config, extra_env):
    """`outbox-relay --config config check --offline` with no OUTBOX_RELAY__* env of
    this shell's, only `extra_env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "RUST_LOG"}
    env.update(extra_env)
    cmd = [relay_bin, "--config", config, "check", "--offline"]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Failed(f"cannot run {relay_bin}: {e}") from e


def check_config(report, relay_bin, objs, work_dir, label="manifests"):
    if not (os.path.isfile(relay_bin) and os.access(relay_bin, os.X_OK)):
        raise Failed(f"relay binary {relay_bin} is not there (or not executable)")
    cms = config_maps(objs)
    if len(cms) != 1:
        report.err(label, f"expected one ConfigMap {CONFIG_MAP}, found {len(cms)}")
        return f"{label}: config not checked"
    where, cm = cms[0]
    data = (cm.get("data") or {}).get("config.toml")
    if not isinstance(data, str):
        report.err(where, f"ConfigMap {CONFIG_MAP} has no config.toml")
        return f"{label}: config not checked"
    config = os.path.join(work_dir, f"config-{label.replace(' ', '-')}.toml")
    with open(config, "w") as f:
        f.write(data)
    runs = [("the ConfigMap alone", {})]
    for _, o, name in workloads(objs):
        for _, c in relay_containers(o):
            who = f"{name} container {c.get('name')}"
            runs.append((f"{who} (its env)", container_env(report, who, c)))
    seen, first_error = None, None  # later runs print only what differs from the first
    for who, env in runs:
        res = run_check(relay_bin, config, env)
        if res.returncode == 0:
            print(f"{who}: outbox-relay check --offline: exit 0")
            lines = res.stdout.splitlines()
            for line in lines if seen is None else [l for l in lines[1:] if l not in seen]:
                print(f"    {line}")
            seen = set(lines) if seen is None else seen
            continue
        why = f"outbox-relay check --offline: exit {res.returncode}: {res.stderr.strip()}"
        if why == first_error:
            print(f"{who}: the same error")
            continue
        first_error = first_error or why
        report.err(f"{where} config.toml, {who}", why)
    return f"{label}: config.toml valid for the relay ({len(runs)} runs of check --offline)"
