#!/usr/bin/env bash
# Regenerate what the chart copies or derives from the rest of the repository:
#
#   bash charts/sync.sh           # write
#   bash charts/sync.sh --check   # change nothing; exit 1 and show the diff if stale
#
# 1. charts/warren-operator/files/crds/        <- crds/*.yaml (crdgen's output)
# 2. charts/warren-operator/files/dashboards/  <- dashboards/*.json
# 3. Chart.yaml version and appVersion          <- [workspace.package] version in Cargo.toml
# 4. charts/warren-operator/tests/snapshot/default.yaml <- `helm template` with default values
#
# charts/test.sh runs --check: a chart out of step with the CRDs, the dashboards or the
# workspace version fails the tests.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$WARREN_ROOT"

CHART=charts/warren-operator
# The snapshot's release name and namespace (also what the README's install command uses).
SNAPSHOT_RELEASE=warren
SNAPSHOT_NAMESPACE=warren-system

check=0
case "${1:-}" in
"") ;;
--check) check=1 ;;
*) die "usage: $0 [--check]" ;;
esac

HELM="${HELM:-$(bash scripts/kubetools.sh | tail -1)/helm}"
[ -x "$HELM" ] || die "helm not found at $HELM"

workspace_version() {
    python3 - <<'EOF'
import re, sys
text = open("Cargo.toml").read()
m = re.search(r'^\[workspace\.package\]\s*$(.*?)^\[', text + "\n[", re.M | re.S)
v = m and re.search(r'^version\s*=\s*"([^"]+)"', m.group(1), re.M)
if not v:
    sys.exit("no version in [workspace.package] of Cargo.toml")
print(v.group(1))
EOF
}

# generate DIR: write the generated copy of the chart into DIR (a copy of the chart).
generate() {
    local out="$1" version
    version="$(workspace_version)"
    rm -rf "$out/files/crds" "$out/files/dashboards"
    mkdir -p "$out/files/crds" "$out/files/dashboards" "$out/tests/snapshot"
    cp crds/*.yaml "$out/files/crds/"
    cp dashboards/*.json "$out/files/dashboards/"
    sed -i -E "s/^version: .*/version: $version/; s/^appVersion: .*/appVersion: \"$version\"/" "$out/Chart.yaml"
    "$HELM" template "$SNAPSHOT_RELEASE" "$out" --namespace "$SNAPSHOT_NAMESPACE" \
        >"$out/tests/snapshot/default.yaml"
}

if ((check)); then
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/warren-chart-sync.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    cp -r "$CHART" "$tmp/warren-operator"
    generate "$tmp/warren-operator"
    if ! diff -ru "$CHART" "$tmp/warren-operator"; then
        die "the chart is out of step with crds/, dashboards/ or the workspace version (diff above): run \`bash charts/sync.sh\` and commit the result"
    fi
    echo "chart in step: CRDs, dashboards, version $(workspace_version), default-render snapshot"
else
    generate "$CHART"
    echo "chart regenerated: files/crds, files/dashboards, version $(workspace_version), tests/snapshot/default.yaml"
fi
