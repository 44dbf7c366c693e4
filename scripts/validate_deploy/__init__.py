"""Offline checks of the deployment artifacts under deploy/, run by scripts/validate-deploy.sh.

Modules:
  common        error collection, loading YAML/JSON/TOML that fails loudly, durations
  k8s           which manifests there are, the kustomize layout, kubernetes-validate,
                `kubectl kustomize` rendering of each overlay
  policy        the rules every relay container and workload must follow
  relay_config  the ConfigMap's config.toml through the relay binary's `check --offline`
  artifacts     Dockerfile invariants, the Grafana dashboard, the Prometheus alert rules
  __main__      the command line: `python3 -m validate_deploy COMMAND` (with scripts/ on
                PYTHONPATH); one command a step of validate-deploy.sh

A failed parse or a missing tool is an error, never a skipped check.
"""
