// Validates Prometheus Operator objects against the prometheus-operator CRD schemas (the
// JSON schemas shipped in @kubernetes-models/prometheus-operator, checked with ajv).
//
//   node charts/tests/validate-monitoring.mjs FILE.json...
//
// Each FILE holds one object as JSON. Exits 1 naming the file and the failing field.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const kinds = { ServiceMonitor, PodMonitor, PrometheusRule };
let failed = 0;
for (const file of process.argv.slice(2)) {
  const obj = JSON.parse(readFileSync(file, "utf8"));
  const Model = kinds[obj.kind];
  if (obj.apiVersion !== "monitoring.coreos.com/v1" || !Model) {
    console.error(`${file}: no schema for ${obj.apiVersion} ${obj.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`${file}: ${obj.kind} ${obj.metadata.name} valid`);
  } catch (e) {
    console.error(`${file}: ${obj.kind} ${obj.metadata?.name} INVALID: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
