"""Kubernetes manifests: which files there are, the kustomize layout (every reference
exists, no stray manifest), schema validation with kubernetes-validate (--strict, for
every version in K8S_VERSIONS; a warning fails too), and `kubectl kustomize` rendering
of each overlay."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import yaml

from .common import ROOT, Failed, display, load_docs

K8S_DIR = ROOT / "deploy" / "k8s"
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def manifests(k8s_dir=K8S_DIR):
    """Every manifest file under `k8s_dir` (kustomization files excluded), sorted."""
    out = []
    for d, _, files in os.walk(k8s_dir):
        for f in files:
            if f.endswith((".yaml", ".yml")) and f not in KUSTOMIZATION_NAMES:
                out.append(os.path.join(d, f))
    if not out:
        raise Failed(f"no manifests under {display(k8s_dir)}")
    return sorted(out)


def count_objects(files):
    return sum(len(load_docs(f)) for f in files)


def _local_ref(entry):
    return not (re.match(r"^[a-z]+://", entry) or entry.startswith(("github.com/", "git@")))


def _entries(k):
    """(field, path) of every file or directory a kustomization refers to."""
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
    return entries


def check_layout(report, k8s_dir=K8S_DIR):
    """Every resources/patches/generator entry exists; every manifest is used by some
    kustomization (except *.example.yaml templates)."""
    referenced = set()
    kfiles = sorted(
        os.path.join(d, f) for d, _, files in os.walk(k8s_dir) for f in files if f in KUSTOMIZATION_NAMES
    )
    if not kfiles:
        report.err(display(k8s_dir), "no kustomization.yaml found")
    for kf in kfiles:
        base, rel = os.path.dirname(kf), display(kf)
        try:
            with open(kf) as f:
                k = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            report.err(rel, f"YAML: {e}")
            continue
        if k.get("kind", "Kustomization") != "Kustomization":
            report.err(rel, f"kind is {k.get('kind')!r}")
        for key, e in _entries(k):
            if not isinstance(e, str) or not _local_ref(e):
                continue
            p = os.path.normpath(os.path.join(base, e))
            if os.path.isdir(p):
                if not any(os.path.exists(os.path.join(p, n)) for n in KUSTOMIZATION_NAMES):
                    report.err(rel, f"{key}: directory {e} has no kustomization.yaml")
            elif not os.path.isfile(p):
                report.err(rel, f"{key}: {e} does not exist")
            referenced.add(p)
    for p in manifests(k8s_dir):
        p = os.path.normpath(p)
        if ".example." not in os.path.basename(p) and p not in referenced:
            report.err(display(p), "not listed in any kustomization.yaml (dead file?)")
    return f"kustomize layout OK ({len(kfiles)} kustomization files)"


def check_schemas(report, label, files, versions):
    """kubernetes-validate --strict (unknown fields are errors) for each version."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        raise Failed("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for v in versions:
        cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", v, *files]
        res = subprocess.run(cmd, capture_output=True, text=True)
        out = (res.stdout + res.stderr).strip()
        if res.returncode != 0:
            report.err(label, f"invalid against Kubernetes {v}:\n{out}")
        elif re.search(r"^WARN", out, re.M):
            # A warning (e.g. a kind without a schema) is a failure too.
            report.err(label, f"warnings against Kubernetes {v}:\n{out}")
        else:
            print(f"{label}: valid against Kubernetes {v} (--strict)")
    return f"{label}: {len(files)} files valid against Kubernetes {', '.join(versions)}"


def render_overlays(report, out_dir, k8s_dir=K8S_DIR):
    """`kubectl kustomize` each overlay into `out_dir`; [(overlay name, rendered file)]."""
    kubectl = shutil.which("kubectl")
    if kubectl is None or subprocess.run([kubectl, "kustomize", "--help"], capture_output=True).returncode:
        raise Failed("kubectl (with kustomize) is not on PATH; VALIDATE_DEPLOY_RENDER=0 skips rendering")
    rendered = []
    overlays = os.path.join(k8s_dir, "overlays")
    for name in sorted(os.listdir(overlays)):
        overlay = os.path.join(overlays, name)
        if not os.path.isdir(overlay):
            continue
        res = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True)
        if res.returncode != 0:
            report.err(f"overlay {name}", f"kubectl kustomize failed:\n{res.stderr.strip()}")
            continue
        path = os.path.join(out_dir, f"rendered-{name}.yaml")
        with open(path, "w") as f:
            f.write(res.stdout)
        print(f"overlay {name}: {count_objects([path])} objects rendered")
        rendered.append((name, path))
    if not rendered and not report.errors:
        report.err(display(overlays), "no overlay rendered")
    return rendered
