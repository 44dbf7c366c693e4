"""Shared helpers: the error list a command fills, loading that fails loudly, durations."""

import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class Failed(Exception):
    """A check could not run at all (a file that does not parse, a missing tool)."""


class Report:
    """Errors found by one command, each as `where: what`."""

    def __init__(self):
        self.errors = []

    def err(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def finish(self, ok_msg):
        """Print the errors (stderr) or `ok_msg`; the command's exit code."""
        for e in self.errors:
            print(f"  error: {e}", file=sys.stderr)
        if self.errors:
            return 1
        print(ok_msg)
        return 0


def display(path):
    """A path relative to the repository root when it is inside it."""
    rel = os.path.relpath(path, ROOT)
    return str(path) if rel.startswith("..") else rel


def load_docs(path):
    """Every non-empty YAML document of `path`; `Failed` if it does not parse."""
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise Failed(f"{display(path)}: cannot load YAML: {e}") from e


def load_yaml(path):
    docs = load_docs(path)
    if len(docs) != 1:
        raise Failed(f"{display(path)}: expected one YAML document, found {len(docs)}")
    return docs[0]


def load_objects(files):
    """(where, object) for every document of `files`; each must be a mapping."""
    out = []
    for f in files:
        for d in load_docs(f):
            if not isinstance(d, dict):
                raise Failed(f"{display(f)}: a document is not a mapping: {d!r:.80}")
            out.append((display(f), d))
    return out


def duration_seconds(s):
    """`"20s"`, `"500ms"`, `"5m"`, `"1h"` in seconds; None if not such a duration."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(s))
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
