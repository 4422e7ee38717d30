//! The deployment artefacts, offline: the Helm chart lints and renders with every value set,
//! every rendered object is valid against the Kubernetes 1.30 schemas (strict) or its CRD's
//! schema, wrong values fail to render, and deploy/k8s/weft.yaml matches the chart
//! (deploy/validate/validate.py, which says what failed).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::*;

#[test]
fn the_chart_and_the_plain_manifests_validate_offline() {
    let root = workspace_root();
    let node_modules = root.join("deploy/validate/node_modules");
    assert!(
        node_modules.is_dir(),
        "{} is missing: run `cargo xtask setup` (it runs `npm ci` there)",
        node_modules.display()
    );
    let output = Command::new(test_python())
        .arg(root.join("deploy/validate/validate.py"))
        .output()
        .expect("cannot run deploy/validate/validate.py (run `cargo xtask setup`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "deploy validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every kind the chart can render was checked, custom resources included.
    for checked in [
        "Deployment/weft",
        "HorizontalPodAutoscaler/weft",
        "NetworkPolicy/weft",
        "ServiceMonitor/weft (monitoring.coreos.com/v1/ServiceMonitor schema)",
        "PrometheusRule/weft (monitoring.coreos.com/v1/PrometheusRule schema)",
        "ScaledObject/weft (keda.sh/v1alpha1/ScaledObject schema)",
        "refused: autoscaling without the shared store",
    ] {
        assert!(
            stdout.contains(checked),
            "{checked} was not checked:\n{stdout}"
        );
    }
}
