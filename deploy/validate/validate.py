"""Offline checks of the Helm chart (deploy/helm/weft) and the plain manifests (deploy/k8s/),
with no helm binary, no cluster and no network:

1. `helm lint --strict` through helm-python-sdk (Helm's own Go code, as a library);
2. the chart rendered with each value set in VALUE_SETS (every template switched on by one of
   them) and with values that must fail to render (FAILING);
3. every rendered object of a built-in kind validated with kubernetes-validate --strict against
   Kubernetes KUBE_VERSION (an unknown field fails; an unknown kind fails instead of the
   library's warning);
4. the custom resources (ServiceMonitor, PrometheusRule, ScaledObject) validated against their
   own CRD schemas (validate-crds.mjs, @kubernetes-models packages from npm);
5. deploy/k8s/weft.yaml equal to the chart rendered with deploy/k8s/values.yaml, so the plain
   manifests never drift from the chart (`--write` regenerates them).

Run by `cargo xtask test` (tests/tests/deploy.rs) with target/venv's Python; exits non-zero
with every failure listed."""
import json
import os
import subprocess
import sys

import helm_python
import kubernetes_validate
import yaml
from helm_python import Chart

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
CHART = os.path.join(ROOT, "deploy", "helm", "weft")
PLAIN = os.path.join(ROOT, "deploy", "k8s")
KUBE_VERSION = "1.30.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}

SHARED_STORE = {
    "store": {
        "databaseUrlSecret": "weft-database",
        "blobUrl": "s3://weft-blobs/prod",
        "s3Endpoint": "http://seaweedfs.storage:8333",
        "s3CredentialsSecret": "weft-s3",
    },
    "adminKey": {"secret": "weft-admin"},
}

VALUE_SETS = {
    "defaults": {},
    "production-hpa": {
        **SHARED_STORE,
        "tls": {"secret": "weft-tls", "clientCaSecret": "weft-client-ca"},
        "repository": {"configMap": {"enabled": False},
                       "s3": {"enabled": True, "url": "s3://weft-repository/models",
                              "endpoint": "http://seaweedfs.storage:8333",
                              "credentialsSecret": "weft-s3"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                    "prometheusRule": {"enabled": True}},
        "autoscaling": {"mode": "hpa", "minReplicas": 3, "maxReplicas": 20},
        "networkPolicy": {"inferenceFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        "serve": {"extraArgs": ["--ort-threads", "2"],
                  "extraEnv": [{"name": "WEFT_LOG", "value": "info"}],
                  "systemSharedMemory": ["default"]},
    },
    "production-keda": {
        **SHARED_STORE,
        "autoscaling": {"mode": "keda"},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "serve": {"grpcPort": 0},
    },
}

# Values that must not render, and words the error must contain.
FAILING = {
    "autoscaling without the shared store": ({"autoscaling": {"mode": "hpa"}}, "shared store"),
    "half a shared store": ({"store": {"blobUrl": "s3://b"}}, "go together"),
    "S3 repository without a URL": ({"repository": {"s3": {"enabled": True}}}, "repository.s3.url"),
}


def documents(rendered):
    """Every object of a render, with the template it came from."""
    for template, text in sorted(rendered.items()):
        if not template.endswith(".yaml"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                yield template, document


def validate_objects(label, objects, failures):
    custom = []
    for template, document in objects:
        name = f"{label}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        if document.get("kind") in CUSTOM_KINDS:
            custom.append(document)
            continue
        try:
            kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
            print(f"ok   {name} ({template})")
        except kubernetes_validate.SchemaNotFoundError as error:
            failures.append(f"{name}: no schema for this kind in Kubernetes {KUBE_VERSION}: {error}")
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{name}: {error.message} at {'.'.join(str(p) for p in error.path)}")
    if custom:
        node_modules = os.path.join(HERE, "node_modules")
        if not os.path.isdir(node_modules):
            failures.append(f"{node_modules} is missing: run `cargo xtask setup` (npm ci in deploy/validate)")
            return
        result = subprocess.run(["node", os.path.join(HERE, "validate-crds.mjs")],
                                input=json.dumps(custom), capture_output=True, text=True, cwd=HERE)
        for line in result.stdout.splitlines():
            print(f"{line[:5]}{label}: {line[5:]}")
        if result.returncode != 0:
            failures.append(f"{label}: custom resources failed their CRD schemas:\n{result.stdout}{result.stderr}")


def main():
    write = "--write" in sys.argv[1:]
    failures = []
    lint = helm_python.lint(CHART, strict=True, kube_version=KUBE_VERSION)
    for message in lint.get("messages", []):
        # Severity 1 is INFO ("icon is recommended"); warnings and errors fail.
        if message.get("severity", 0) > 1:
            failures.append(f"helm lint: {message}")
    failures.extend(f"helm lint: {error}" for error in lint.get("errors", []))
    print(f"helm lint: {len(lint.get('messages', []))} messages")

    chart = Chart.load(CHART)
    kinds = set()
    for label, values in VALUE_SETS.items():
        rendered = chart.render(values, name="weft", namespace="inference")
        objects = list(documents(rendered))
        kinds.update(document["kind"] for _, document in objects)
        validate_objects(label, objects, failures)
    for wanted in ["Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget",
                   "NetworkPolicy", "HorizontalPodAutoscaler", *CUSTOM_KINDS]:
        if wanted not in kinds:
            failures.append(f"no value set renders a {wanted}")

    for label, (values, words) in FAILING.items():
        try:
            chart.render(values, name="weft", namespace="inference")
            failures.append(f"{label}: rendered, but must fail saying '{words}'")
        except helm_python.HelmError as error:
            if words not in str(error):
                failures.append(f"{label}: failed without '{words}': {error}")
            else:
                print(f"ok   refused: {label}")

    with open(os.path.join(PLAIN, "values.yaml")) as source:
        plain_values = yaml.safe_load(source) or {}
    rendered = chart.render(plain_values, name="weft", namespace="weft")
    header = ("# Rendered from deploy/helm/weft with deploy/k8s/values.yaml by\n"
              "# `python deploy/validate/validate.py --write`; do not edit (CI checks it matches).\n")
    text = header + "".join(f"---\n# Source: {template}\n{body.strip()}\n"
                            for template, body in sorted(rendered.items())
                            if template.endswith(".yaml") and body.strip())
    manifest = os.path.join(PLAIN, "weft.yaml")
    if write:
        with open(manifest, "w") as target:
            target.write(text)
        print(f"wrote {manifest}")
    else:
        current = open(manifest).read() if os.path.exists(manifest) else ""
        if current != text:
            failures.append(f"{manifest} differs from the chart rendered with deploy/k8s/values.yaml: "
                            "run `target/venv/bin/python deploy/validate/validate.py --write`")
    plain_objects = [("deploy/k8s/weft.yaml", d) for d in yaml.safe_load_all(text) if d]
    validate_objects("deploy/k8s", plain_objects, failures)

    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {failure}" for failure in failures))
        sys.exit(1)
    print("\nall charts, renders and manifests valid")


if __name__ == "__main__":
    main()
