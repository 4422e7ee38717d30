// Validates custom resources against their own schemas (the CRDs of prometheus-operator and
// KEDA, as @kubernetes-models publishes them). Reads a JSON array of objects on stdin; prints
// one line per object; exits 1 if any is invalid or of a kind it has no schema for.
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
for (const object of JSON.parse(input)) {
  const id = `${object.apiVersion}/${object.kind}`;
  const name = `${object.kind}/${object.metadata?.name}`;
  const Model = models[id];
  if (!Model) {
    console.log(`FAIL ${name}: no schema for ${id}`);
    failed = true;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok   ${name} (${id} schema)`);
  } catch (error) {
    console.log(`FAIL ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
