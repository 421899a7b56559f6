"""Validates rendered chart manifests (output of `helm template`) against the Kubernetes
schemas of one release with kubernetes-validate (strict: unknown fields are errors).

    python validate_manifests.py --kubernetes-version 1.33.0 \
        --custom-out DIR [--rules-out FILE] [--dashboards DIR] RENDERED.yaml...

Every document of a built-in kind (CustomResourceDefinitions included: they are objects
of apiextensions.k8s.io/v1) is validated here; a kind without a schema is a failure, never
skipped. Objects of the Prometheus Operator's custom kinds (monitoring.coreos.com) are
written as JSON to --custom-out for validate-monitoring.mjs, which checks them against the
prometheus-operator CRD schemas; any other custom kind is a failure. --rules-out writes the
rule groups of the PrometheusRule (for promtool). --dashboards DIR checks that each
dashboard ConfigMap carries exactly the JSON of DIR/<file>.
"""

import argparse
import json
import os
import sys

import kubernetes_validate
import yaml

CUSTOM_GROUPS = {"monitoring.coreos.com/v1"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubernetes-version", required=True)
    ap.add_argument("--custom-out", required=True)
    ap.add_argument("--rules-out")
    ap.add_argument("--dashboards")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    failures = 0
    checked = 0
    custom = 0
    rules = None
    dashboards_seen = set()
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"{path}: no manifests rendered", file=sys.stderr)
            failures += 1
        for i, doc in enumerate(docs):
            where = f"{path}#{i} {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            api = doc.get("apiVersion", "")
            if api in CUSTOM_GROUPS:
                out = os.path.join(args.custom_out, f"{os.path.basename(path)}-{i}.json")
                with open(out, "w") as o:
                    json.dump(doc, o)
                custom += 1
                if doc.get("kind") == "PrometheusRule":
                    rules = {"groups": doc["spec"]["groups"]}
                continue
            try:
                kubernetes_validate.validate(doc, args.kubernetes_version, strict=True)
                checked += 1
            except kubernetes_validate.ValidationError as e:
                print(f"INVALID {where}: {e.message} at {'.'.join(str(p) for p in e.path)}",
                      file=sys.stderr)
                failures += 1
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"NO SCHEMA {where}: {e} (a kind the test cannot validate is a failure)",
                      file=sys.stderr)
                failures += 1
            if args.dashboards and doc.get("kind") == "ConfigMap" and "dashboard" in doc["metadata"]["name"]:
                for key, text in doc.get("data", {}).items():
                    want_path = os.path.join(args.dashboards, key)
                    if not os.path.exists(want_path):
                        print(f"{where}: {key} is not a dashboard in {args.dashboards}", file=sys.stderr)
                        failures += 1
                        continue
                    with open(want_path) as w:
                        if json.loads(text) != json.load(w):
                            print(f"{where}: {key} differs from {want_path}", file=sys.stderr)
                            failures += 1
                    dashboards_seen.add(key)
    if args.dashboards and dashboards_seen:
        missing = {f for f in os.listdir(args.dashboards) if f.endswith(".json")} - dashboards_seen
        if missing:
            print(f"dashboards not shipped in a ConfigMap: {sorted(missing)}", file=sys.stderr)
            failures += 1
    if args.rules_out:
        if rules is None:
            print("no PrometheusRule rendered, but --rules-out was given", file=sys.stderr)
            failures += 1
        else:
            with open(args.rules_out, "w") as o:
                yaml.safe_dump(rules, o, sort_keys=False)
    print(f"{checked} manifests valid against Kubernetes {args.kubernetes_version} (strict), "
          f"{custom} Prometheus Operator objects written for their schema check, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
