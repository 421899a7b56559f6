"""Runs every query of the Grafana dashboards through a real Prometheus (HTTP API) and
fails unless each returns data. Used by panels_test.sh.

    python panels_check.py --prometheus URL [--rules RULES.yaml] DASHBOARD.json...

For each dashboard: the template variables are resolved as Grafana would (query variables
of the form label_values(selector, label) through /api/v1/series; the first value is
used), then every panel's every target (rows included) is run through /api/v1/query with
$__rate_interval = 1m, $__interval = 15s, $__range = 5m. A target passes when its result is
non-empty and holds at least one finite value. Prometheus may not have scraped enough yet,
so failing targets are retried until --timeout.

--rules: a Prometheus rule file (the chart's PrometheusRule, rendered). Every vector
selector of every alert (name{matchers}) must select series in the live Prometheus, so the
alerts use metric names and labels that exist.
"""

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request

GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


class Prom:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, **params):
        q = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)


def substitute(expr, variables):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in variables:
            return variables[name]
        raise KeyError(f"unknown variable ${name} in {expr!r}")

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def resolve_variables(prom, dashboard):
    variables = dict(GRAFANA_BUILTINS)
    problems = []
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if var["type"] == "datasource":
            variables[name] = "prometheus"
            continue
        if var["type"] != "query":
            problems.append(f"variable {name}: type {var['type']} is not handled by this test")
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", substitute(q, variables))
        if not m:
            problems.append(f"variable {name}: query {q!r} is not label_values(selector, label)")
            continue
        selector, label = m.groups()
        series = prom.get("/api/v1/series", **{"match[]": selector})
        values = sorted({s[label] for s in series if s.get(label)})
        if not values:
            problems.append(f"variable {name}: {q} returned no values")
            break
        variables[name] = values[0]
        print(f"  variable ${name} = {values[0]!r} (from {q})")
    return variables, problems


def targets(dashboard):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            yield p, t


def has_data(result):
    if result["resultType"] != "vector":
        return bool(result["result"])
    return any(math.isfinite(float(s["value"][1])) for s in result["result"])


def check_dashboard(prom, path, deadline):
    with open(path) as f:
        dashboard = json.load(f)
    print(f"{path}: {dashboard['title']}")
    # Until Prometheus has scraped, the variables have no values yet: retry.
    while True:
        try:
            variables, problems = resolve_variables(prom, dashboard)
        except KeyError as e:
            variables, problems = {}, [str(e)]
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(2)
    if problems:
        return 0, problems
    pending = {}
    for panel, target in targets(dashboard):
        what = f"panel {panel.get('title')!r} target {target.get('refId')}"
        ds = target.get("datasource") or panel.get("datasource")
        if not ds or ds.get("uid") != "${datasource}":
            problems.append(f"{what}: datasource is not the ${{datasource}} variable: {ds}")
        expr = target.get("expr")
        if not expr:
            problems.append(f"{what}: no expr")
            continue
        try:
            pending[what] = substitute(expr, variables)
        except KeyError as e:
            problems.append(f"{what}: {e}")
    if not pending and not problems:
        problems.append("no panel queries at all")
    passed = {}
    last = {}
    while pending:
        for what, expr in list(pending.items()):
            try:
                result = prom.query(expr)
            except Exception as e:  # a bad query is reported, not retried forever
                last[what] = f"error: {e}"
                continue
            if has_data(result):
                values = [s["value"][1] for s in result["result"]][:3] if result["resultType"] == "vector" else "..."
                passed[what] = values
                del pending[what]
            else:
                last[what] = f"no data: {result['result']}"
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(2)
    for what, values in passed.items():
        print(f"  ok  {what}: {values}")
    for what, expr in pending.items():
        problems.append(f"{what}: {last.get(what)}\n      query: {expr}")
    return len(passed), problems


SELECTOR = re.compile(r"\b(up|rabbitmq_\w+|warren_(?:operator|shovel|federation)_\w+)\b\s*(\{[^}]*\})?")


def check_rules(prom, path):
    """Every selector of every alert selects live series."""
    import yaml  # PyYAML: panels_test.sh runs this in a venv that has it

    with open(path) as f:
        rules = yaml.safe_load(f)
    passed, problems = 0, []
    for group in rules["groups"]:
        for rule in group["rules"]:
            selectors = {m.group(0).strip() for m in SELECTOR.finditer(rule["expr"])}
            if not selectors:
                problems.append(f"alert {rule['alert']}: no metric selector found in {rule['expr']!r}")
            for sel in sorted(selectors):
                result = prom.query(sel)
                if result["result"]:
                    print(f"  ok  alert {rule['alert']}: {sel} selects {len(result['result'])} series")
                    passed += 1
                else:
                    problems.append(f"alert {rule['alert']}: {sel} selects nothing")
    return passed, problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--rules")
    ap.add_argument("dashboards", nargs="+")
    args = ap.parse_args()
    prom = Prom(args.prometheus)
    deadline = time.monotonic() + args.timeout
    total, problems = 0, []
    for path in args.dashboards:
        n, p = check_dashboard(prom, path, deadline)
        total += n
        problems += [f"{path}: {x}" for x in p]
    if args.rules:
        n, p = check_rules(prom, args.rules)
        total += n
        problems += p
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"{total} passed, {len(problems)} failed")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
