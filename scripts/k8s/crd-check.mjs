// Validates the Gateway API and Prometheus Operator objects in YAML files against their CRD
// schemas (the @kubernetes-models packages): kinds kubernetes-validate has no schema for.
import fs from "node:fs";
import yaml from "js-yaml";
import * as gateway from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const kinds = {
  "gateway.networking.k8s.io/v1": gateway,
  "monitoring.coreos.com/v1": monitoring,
};
let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    const model = doc && kinds[doc.apiVersion]?.[doc.kind];
    if (!model) continue;
    checked++;
    try {
      new model(doc).validate();
      console.log(`ok ${file}: ${doc.kind} ${doc.metadata.name}`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${file}: ${doc.kind} ${doc.metadata?.name}: ${e.message}`);
    }
  }
}
console.log(`${checked} custom resources checked, ${failed} failed`);
process.exit(failed ? 1 : 0);
