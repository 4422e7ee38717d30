//! Multi-tenancy end to end: API keys, the isolation matrix (another tenant's names are 404
//! exactly like unknown ones, on the data plane, the control plane and inside plugins), the
//! signature matrix, quotas (429 with Retry-After, recovery; storage 403), durability across a
//! restart and across SIGKILL during uploads, and hot swap under load with zero failures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::tenants::*;
use support::*;
use weft_store::signing::SecretKey;

/// Tenant A with its own signed plugins, model and graph; tenant B with nothing shared.
async fn two_tenants(server: &Server) -> (String, String) {
    let a = create_tenant(server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let b = create_tenant(server, "bolt", json!({})).await;
    let secret = signing_key(server, &a).await;
    push_classify_plugins(server, &a, &secret, "1.0.0").await;
    let (status, body) = push_model(server, &a, "secret-mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = apply_graph(
        server,
        &a,
        "secret-graph",
        &classify_graph("secret-graph", 1, "secret-mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (a, b)
}

fn platform_repo() -> Repo {
    Repo::new().with_model(&quickstart(), "mlp")
}

#[tokio::test]
async fn keys_select_the_tenant_and_missing_or_bad_keys_get_401() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let anonymous = reqwest::Client::new();
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/metrics",
        "/api/v1/openapi.json",
    ] {
        let status = anonymous
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path} must stay open");
    }
    let (_, openapi) = send(anonymous.get(server.url("/api/v1/openapi.json"))).await;
    for path in [
        "/v2/models/{model}/infer",
        "/v2/models/{model}/config",
        "/v2/systemsharedmemory/region/{name}/register",
        "/api/v1/tenants",
        "/api/v1/tenants/{tenant}/keys/{id}",
        "/api/v1/signing-keys",
        "/api/v1/signing-keys/challenge",
        "/api/v1/plugins/{name}/versions/{version}",
        "/api/v1/models/{name}/versions/{version}",
        "/api/v1/graphs/{name}",
        "/api/v1/rollouts/{name}",
        "/api/v1/rollouts/{name}/promote",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}/{file}",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    let (status, body) = send(anonymous.get(server.url("/v2/models/mlp"))).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    let (status, _) =
        send(client_with_key("weft_0123456789abcdef_nope").get(server.url("/v2/models/mlp"))).await;
    assert_eq!(status, 401);
    // The bootstrap tenant shares every repository model.
    let (status, _) = infer(&server, TEST_KEY, "mlp").await;
    assert_eq!(status, 200);
    // The admin API wants the admin key, not a tenant key.
    let (status, _) = send(client().get(server.url("/api/v1/tenants"))).await;
    assert_eq!(status, 401);

    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let (status, whoami) = send(client_with_key(&key).get(server.url("/api/v1/tenant"))).await;
    assert_eq!(status, 200);
    assert_eq!(whoami["name"], "acme");
    assert!(
        !whoami.to_string().contains(&key),
        "a key is shown only once"
    );
    let (status, listed) = send(admin().get(server.url("/api/v1/tenants"))).await;
    assert_eq!(status, 200);
    assert!(!listed.to_string().contains(&key));
    // A second key works; revoking the first stops it at once.
    let (status, second) = send(admin().post(server.url("/api/v1/tenants/acme/keys"))).await;
    assert_eq!(status, 201);
    let second = second["key"].as_str().unwrap().to_string();
    assert_eq!(infer(&server, &second, "mlp").await.0, 200);
    let first_id = whoami["api_keys"][0]["id"].as_str().unwrap();
    let (status, _) =
        send(admin().delete(server.url(&format!("/api/v1/tenants/acme/keys/{first_id}")))).await;
    assert_eq!(status, 200);
    assert_eq!(infer(&server, &key, "mlp").await.0, 401);
    assert_eq!(infer(&server, &second, "mlp").await.0, 200);
    // Duplicate tenants and bad names are refused with reasons.
    let (status, body) = send(
        admin()
            .post(server.url("/api/v1/tenants"))
            .json(&json!({"name": "acme"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = send(
        admin()
            .post(server.url("/api/v1/tenants"))
            .json(&json!({"name": "../etc"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn isolation_matrix_another_tenants_names_are_404_like_unknown_ones() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let (a, b) = two_tenants(&server).await;

    // A can use everything it owns and the shared mlp.
    for name in ["secret-mlp", "secret-graph", "mlp"] {
        let (status, body) = infer(&server, &a, name).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    let (_, graph) = infer(&server, &a, "secret-graph").await;
    // A tenant's models and graphs have their own series, named `tenant/name`, never merged
    // with a platform model or graph of the same name.
    let metrics = scrape(&server).await;
    for series in [
        "weft_compute_duration_seconds_count{model=\"acme/secret-mlp\"}",
        "weft_graph_node_duration_seconds_count{graph=\"acme/secret-graph\",node=\"mlp\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    let provenance = graph["parameters"]["provenance"].as_array().unwrap();
    assert_eq!(provenance.len(), 2, "{graph}");
    assert!(
        provenance
            .iter()
            .all(|p| p["digest"].as_str().unwrap().starts_with("sha256:"))
    );

    // B: A's names answer exactly as names that do not exist.
    let unknown = |status: u16, body: &Value, what: &str| {
        assert_eq!(status, 404, "{what}: {body}");
        assert!(
            !body.to_string().contains("acme"),
            "{what} leaks the owner: {body}"
        );
    };
    for name in ["secret-mlp", "secret-graph", "mlp", "no-such-name"] {
        let (status, body) = infer(&server, &b, name).await;
        unknown(status, &body, &format!("infer {name}"));
        let (status, body) =
            send(client_with_key(&b).get(server.url(&format!("/v2/models/{name}")))).await;
        unknown(status, &body, &format!("metadata {name}"));
        let (status, body) =
            send(client_with_key(&b).get(server.url(&format!("/v2/models/{name}/ready")))).await;
        unknown(status, &body, &format!("ready {name}"));
        let (status, body) =
            send(client_with_key(&b).get(server.url(&format!("/v2/models/{name}/stats")))).await;
        unknown(status, &body, &format!("stats {name}"));
        let (status, body) =
            send(client_with_key(&b).get(server.url(&format!("/v2/models/{name}/config")))).await;
        unknown(status, &body, &format!("config {name}"));
        assert_eq!(
            body["error"],
            format!("Request for unknown model: '{name}' is not found"),
            "another tenant's name and a missing one answer the same"
        );
    }
    let (_, index) = send(client_with_key(&b).post(server.url("/v2/repository/index"))).await;
    assert_eq!(index, json!([]), "B sees nothing");
    for path in ["/api/v1/plugins", "/api/v1/models", "/api/v1/graphs"] {
        let (status, listed) = send(client_with_key(&b).get(server.url(path))).await;
        assert_eq!(status, 200);
        assert!(
            !listed.to_string().contains("secret") && !listed.to_string().contains("normalize"),
            "{path}: {listed}"
        );
    }
    for path in [
        "/api/v1/plugins/normalize",
        "/api/v1/models/secret-mlp",
        "/api/v1/graphs/secret-graph",
    ] {
        let (status, body) = send(client_with_key(&b).get(server.url(path))).await;
        unknown(status, &body, path);
        let (status, body) = send(client_with_key(&b).delete(server.url(path))).await;
        unknown(status, &body, path);
    }
    // B's pushes land in B's namespace and leave A's untouched (A's revision included: it
    // counts A's own changes only, so B cannot watch A's activity through it).
    let revision = |key: String| {
        let server = &server;
        async move {
            let (status, body) =
                send(client_with_key(&key).get(server.url("/api/v1/tenant"))).await;
            assert_eq!(status, 200, "{body}");
            body["revision"].as_u64().unwrap()
        }
    };
    let a_revision = revision(a.clone()).await;
    let b_revision = revision(b.clone()).await;
    assert!(
        a_revision >= 4,
        "A registered a key, pushed 3 things: {a_revision}"
    );
    let secret_b = signing_key(&server, &b).await;
    let (status, body) = push_plugin(
        &server,
        &b,
        &secret_b,
        "normalize",
        "1.0.0",
        guest("softmax"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = push_model(&server, &b, "secret-mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (_, a_plugin) =
        send(client_with_key(&a).get(server.url("/api/v1/plugins/normalize"))).await;
    assert_eq!(
        a_plugin["versions"][0]["digest"],
        json!(format!(
            "sha256:{}",
            weft_store::signing::sha256_hex(&guest("normalize"))
        ))
    );
    assert_eq!(infer(&server, &a, "secret-graph").await.0, 200);
    assert_eq!(revision(a.clone()).await, a_revision);
    assert_eq!(revision(b.clone()).await, b_revision + 3);

    // B cannot reach A's model from a graph or from inside a plugin (wasi:nn load-by-name).
    let (status, body) = push_plugin(
        &server,
        &b,
        &secret_b,
        "call-model",
        "1",
        guest("runtime_call_model"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // A model only A owns (B has no model of that name), and the platform mlp shared with A
    // but not with B: neither can be granted, named by a model node, or loaded by name.
    let (status, body) = push_model(&server, &a, "acme-private", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(infer(&server, &a, "acme-private").await.0, 200);
    for target in ["acme-private", "mlp"] {
        let graph = call_model_graph("steal", 1, "call-model", target, target);
        let (status, body) = apply_graph(&server, &b, "steal", &graph).await;
        assert_eq!(
            status, 400,
            "a grant of {target}, which B cannot see: {body}"
        );
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains(&format!("unknown model '{target}'")),
            "{body}"
        );
        let node = classify_graph("steal", 1, target);
        let (status, body) = apply_graph(&server, &b, "steal", &node).await;
        assert_eq!(status, 400, "a model node naming {target}: {body}");
        assert!(!body.to_string().contains("acme\""), "{body}");
    }
    // Granting its own model but asking the sandbox for another tenant's name: refused inside
    // the call exactly like a name that exists nowhere.
    let mut refusals = Vec::new();
    for (version, target) in [(1, "acme-private"), (2, "mlp"), (3, "no-such-model")] {
        let graph = call_model_graph("steal", version, "call-model", "secret-mlp", target);
        let (status, body) = apply_graph(&server, &b, "steal", &graph).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = infer(&server, &b, "steal").await;
        assert!(status >= 400, "{body}");
        assert!(!body.to_string().contains("acme\""), "{body}");
        let error = body["error"]
            .as_str()
            .unwrap()
            .replace(target, "<name>")
            .replace(&format!("version {version}"), "version <v>");
        refusals.push((status, error));
    }
    assert!(
        refusals.windows(2).all(|pair| pair[0] == pair[1]),
        "another tenant's model must look like a missing one: {refusals:?}"
    );
    // And with the grant it owns, the same plugin works.
    let graph = call_model_graph("steal", 4, "call-model", "secret-mlp", "secret-mlp");
    let (status, body) = apply_graph(&server, &b, "steal", &graph).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = infer(&server, &b, "steal").await;
    assert_eq!(status, 200, "{body}");
    // The operator deleting A removes all of it; B is unaffected.
    let (status, _) = send(admin().delete(server.url("/api/v1/tenants/acme"))).await;
    assert_eq!(status, 200);
    assert_eq!(infer(&server, &a, "secret-graph").await.0, 401);
    assert_eq!(infer(&server, &b, "steal").await.0, 200);
    // Its metric series go with it (labels stay bounded by what exists); B's stay.
    let metrics = scrape(&server).await;
    assert!(
        !metrics.contains("tenant=\"acme\"") && !metrics.contains("\"acme/"),
        "series of deleted tenant acme remain:\n{metrics}"
    );
    assert!(metrics.contains("tenant=\"bolt\""), "{metrics}");
    assert!(
        metrics.contains("plugin=\"bolt/call-model@1\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn signature_matrix_refuses_unsigned_tampered_wrong_and_revoked_and_stores_nothing() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({})).await;
    let other_tenant = create_tenant(&server, "bolt", json!({})).await;
    let secret = signing_key(&server, &key).await;
    let bytes = guest("normalize");
    let good = secret.sign_plugin(&bytes, "normalize", "1");
    let unregistered = SecretKey::generate()
        .unwrap()
        .sign_plugin(&bytes, "acme", "normalize", "1");
    let bolts = signing_key(&server, &other_tenant)
        .await
        .sign_plugin(&bytes, "normalize", "1");
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let for_other_name = secret.sign_plugin(&bytes, "softmax", "1");
    let for_other_version = secret.sign_plugin(&bytes, "normalize", "2");

    let refusals: Vec<(&str, Vec<u8>, Option<(&str, &str)>, &str)> = vec![
        ("unsigned", bytes.clone(), None, "unsigned plugin"),
        (
            "tampered bytes",
            tampered,
            Some((&good.signature, &good.key_id)),
            "does not verify",
        ),
        (
            "signed for another name",
            bytes.clone(),
            Some((&for_other_name.signature, &for_other_name.key_id)),
            "does not verify",
        ),
        (
            "signed for another version",
            bytes.clone(),
            Some((&for_other_version.signature, &for_other_version.key_id)),
            "does not verify",
        ),
        (
            "unregistered key",
            bytes.clone(),
            Some((&unregistered.signature, &unregistered.key_id)),
            "unknown signing key",
        ),
        (
            "another tenant's key",
            bytes.clone(),
            Some((&bolts.signature, &bolts.key_id)),
            "unknown signing key",
        ),
        (
            "garbage signature",
            bytes.clone(),
            Some(("not base64!", &good.key_id)),
            "signature",
        ),
        ("not a component", b"\0asm junk".to_vec(), None, "unsigned"),
    ];
    for (case, body, signature, expected) in refusals {
        let (status, answer) = push_signed(&server, &key, "normalize", "1", body, signature).await;
        assert_eq!(status, 400, "{case}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(expected), "{case}: {error}");
        let (_, listed) = send(client_with_key(&key).get(server.url("/api/v1/plugins"))).await;
        assert_eq!(listed, json!({"plugins": []}), "{case} stored something");
    }
    // A signed non-component is refused as not a plugin.
    let junk = b"\0asm\x0d\0\x01\0".to_vec();
    let (status, answer) = push_plugin(&server, &key, &secret, "junk", "1", junk).await;
    assert_eq!(status, 400, "{answer}");

    // The good one lands; the same version again is a conflict.
    let (status, body) = push_signed(
        &server,
        &key,
        "normalize",
        "1",
        bytes.clone(),
        Some((&good.signature, &good.key_id)),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["key_id"], json!(good.key_id));
    let (status, _) = push_signed(
        &server,
        &key,
        "normalize",
        "1",
        bytes.clone(),
        Some((&good.signature, &good.key_id)),
    )
    .await;
    assert_eq!(status, 409);
    let (status, body) =
        push_plugin(&server, &key, &secret, "softmax", "1", guest("softmax")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 400, "mlp is not shared with acme: {body}");
    let (status, body) = push_model(&server, &key, "mlp", 1, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(infer(&server, &key, "classify").await.0, 200);

    // Revoking the key: its plugins stop loading, so the graph stops serving, and new pushes
    // signed by it are refused.
    let (status, _) = send(
        client_with_key(&key).delete(server.url(&format!("/api/v1/signing-keys/{}", good.key_id))),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = infer(&server, &key, "classify").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let again = secret.sign_plugin(&bytes, "normalize", "2");
    let (status, body) = push_signed(
        &server,
        &key,
        "normalize",
        "2",
        bytes,
        Some((&again.signature, &again.key_id)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
}

#[tokio::test]
async fn graph_apply_errors_match_graph_check_and_deletes_in_use_are_refused() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let secret = signing_key(&server, &key).await;
    push_plugin(&server, &key, &secret, "normalize", "1", guest("normalize")).await;
    push_plugin(&server, &key, &secret, "softmax", "1", guest("softmax")).await;
    let broken = classify_graph("classify", 1, "no-such-model");
    let (status, body) = send(
        client_with_key(&key)
            .put(server.url("/api/v1/graphs/classify"))
            .header("Weft-File-Name", "mine.toml")
            .body(broken),
    )
    .await;
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("mine.toml:"), "{error}");
    assert!(
        error.contains("node 'mlp'") && error.contains("unknown model 'no-such-model'"),
        "{error}"
    );
    // A dry run checks against the tenant's namespace exactly as an apply (same error text)
    // and stores nothing.
    let dry_run = |text: String| {
        client_with_key(&key)
            .put(server.url("/api/v1/graphs/classify"))
            .header("Weft-File-Name", "mine.toml")
            .header("Weft-Dry-Run", "true")
            .body(text)
    };
    let (status, body) = send(dry_run(classify_graph("classify", 1, "no-such-model"))).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"].as_str().unwrap(), error);
    let (status, body) = send(dry_run(classify_graph("classify", 1, "mlp"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dry_run"], true, "{body}");
    let (status, _) = send(client_with_key(&key).get(server.url("/api/v1/graphs/classify"))).await;
    assert_eq!(status, 404, "a dry run stores nothing");
    let (status, body) = apply_graph(
        &server,
        &key,
        "other",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 400, "name mismatch: {body}");
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        send(client_with_key(&key).delete(server.url("/api/v1/plugins/normalize"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("classify"));
    let (status, body) =
        send(client_with_key(&key).get(server.url("/api/v1/graphs/classify"))).await;
    assert_eq!(status, 200);
    assert!(
        body["versions"][0]["toml"]
            .as_str()
            .unwrap()
            .contains("normalize")
    );
    // Graph versions are immutable: the same text again changes nothing, other text is 409.
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(
        (status, body["unchanged"].clone()),
        (201, json!(true)),
        "{body}"
    );
    let changed = classify_graph("classify", 1, "mlp").replace("top_k = 1", "top_k = 2");
    let (status, body) = apply_graph(&server, &key, "classify", &changed).await;
    assert_eq!(status, 409, "{body}");
    // A node pinning a model version keeps that version from being deleted; others may go.
    for version in [1, 2] {
        assert_eq!(
            push_model(&server, &key, "pinned", version, MLP_CONFIG, &mlp_onnx())
                .await
                .0,
            201
        );
    }
    let pin = classify_graph("pin", 1, "pinned")
        .replace("model = \"pinned\"", "model = \"pinned\"\nversion = \"1\"");
    let (status, body) = apply_graph(&server, &key, "pin", &pin).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        send(client_with_key(&key).delete(server.url("/api/v1/models/pinned/versions/1"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("'pin' version 1"),
        "{body}"
    );
    let (status, body) =
        send(client_with_key(&key).delete(server.url("/api/v1/models/pinned/versions/2"))).await;
    assert_eq!(status, 200, "{body}");
    // A graph may not take a name the tenant already sees as a model (its own or shared).
    let (status, body) =
        apply_graph(&server, &key, "mlp", &classify_graph("mlp", 1, "pinned")).await;
    assert_eq!(status, 409, "{body}");
    // A tenant's model may not ask for more sessions than the server allows a tenant.
    let greedy = "platform = \"onnx\"\n[ort]\ninstance_count = 100000\n";
    let (status, body) = push_model(&server, &key, "greedy", 1, greedy, &mlp_onnx()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("instance_count"),
        "{body}"
    );
    // Wrong methods get a JSON error too.
    let (status, body) = send(client_with_key(&key).delete(server.url("/api/v1/tenant"))).await;
    assert_eq!(status, 405, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not allowed"),
        "{body}"
    );
    // A path that does not decode gets a JSON error as well.
    let (status, body) = send(client_with_key(&key).get(server.url("/api/v1/plugins/%FF"))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bad request path"),
        "{body}"
    );
    // One version at a time: a graph's and a plugin's; the others keep serving.
    let (status, body) = apply_graph(
        &server,
        &key,
        "classify",
        &classify_graph("classify", 2, "mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        push_plugin(&server, &key, &secret, "softmax", "2", guest("softmax")).await;
    assert_eq!(status, 201, "{body}");
    for (path, expected) in [
        ("/api/v1/graphs/classify/versions/1", 200),
        ("/api/v1/graphs/classify/versions/1", 404),
        ("/api/v1/graphs/classify/versions/zero", 400),
        ("/api/v1/plugins/softmax/versions/1", 200),
        ("/api/v1/plugins/softmax/versions/1", 404),
    ] {
        let (status, body) = send(client_with_key(&key).delete(server.url(path))).await;
        assert_eq!(status, expected, "{path}: {body}");
        if expected == 404 {
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("unknown version '1'"),
                "{body}"
            );
        }
    }
    let (_, listed) = send(client_with_key(&key).get(server.url("/api/v1/graphs/classify"))).await;
    assert_eq!(listed["versions"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["versions"][0]["version"], "2", "{listed}");
    assert_eq!(infer(&server, &key, "classify").await.0, 200);

    let (status, _) =
        send(client_with_key(&key).delete(server.url("/api/v1/graphs/classify"))).await;
    assert_eq!(status, 200);
    assert_eq!(infer(&server, &key, "classify").await.0, 404);
    let (status, body) =
        send(client_with_key(&key).delete(server.url("/api/v1/plugins/normalize"))).await;
    assert_eq!(status, 409, "graph 'pin' still uses it: {body}");
    let (status, _) = send(client_with_key(&key).delete(server.url("/api/v1/graphs/pin"))).await;
    assert_eq!(status, 200);
    let (status, _) =
        send(client_with_key(&key).delete(server.url("/api/v1/plugins/normalize"))).await;
    assert_eq!(status, 200);
    // A model that does not load stores nothing.
    let (status, body) = push_model(&server, &key, "bad", 1, MLP_CONFIG, b"not onnx").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = push_model(
        &server,
        &key,
        "bad",
        1,
        "platform = \"tensorflow\"\n",
        &mlp_onnx(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, listed) = send(client_with_key(&key).get(server.url("/api/v1/models"))).await;
    assert!(!listed.to_string().contains("\"bad\""), "{listed}");
    // Every upload is counted by kind and answer; dry runs are not uploads.
    let metrics = scrape(&server).await;
    for (series, count) in [
        ("weft_uploads_total{kind=\"plugin\",status=\"ok\"}", 3),
        ("weft_uploads_total{kind=\"model\",status=\"400\"}", 3),
        ("weft_uploads_total{kind=\"graph\",status=\"400\"}", 2),
        ("weft_uploads_total{kind=\"graph\",status=\"409\"}", 2),
    ] {
        assert!(
            metrics.contains(&format!("{series} {count}")),
            "{series} {count} missing:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn rate_and_concurrency_quotas_answer_429_with_retry_after_and_recover() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let key = create_tenant(
        &server,
        "small",
        json!({ "shared_models": ["*"], "quotas": { "requests_per_second": 2.0, "burst": 3 } }),
    )
    .await;
    let other = create_tenant(&server, "other", json!({ "shared_models": ["*"] })).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let response = client_with_key(&key)
            .post(server.url("/v2/models/mlp/infer"))
            .json(&row())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("rate quota"),
                "{body}"
            );
        }
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    let seconds: u64 = retry_after
        .expect("429 without Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&seconds));
    // Metadata and control-plane reads pay the same quota.
    // (The bucket refills at 2/s, so on a slow machine a call may find a fresh token: at most
    // a few of ten back-to-back calls can pass.)
    for path in [
        "/v2/models/mlp",
        "/api/v1/plugins",
        "/api/v1/models/m/versions/1",
    ] {
        let mut refused = 0;
        for _ in 0..10 {
            let request = if path.contains("versions") {
                // An upload, malformed so that one let through stores nothing (400).
                client_with_key(&key)
                    .put(server.url(path))
                    .body("not a model")
            } else {
                client_with_key(&key).get(server.url(path))
            };
            let (status, body) = send(request).await;
            assert!(matches!(status, 200 | 400 | 429), "{path}: {status} {body}");
            refused += usize::from(status == 429);
        }
        assert!(
            refused >= 5,
            "{path}: only {refused} of 10 calls were over the quota"
        );
    }
    // Another tenant is not affected.
    assert_eq!(infer(&server, &other, "mlp").await.0, 200);
    // After the advertised wait the tenant is served again.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    assert_eq!(infer(&server, &key, "mlp").await.0, 200);

    // Concurrency: one slot, a slow request holds it.
    let (status, _) = send(admin().patch(server.url("/api/v1/tenants/small")).json(&json!({
        "quotas": { "requests_per_second": 1000.0, "burst": 1000, "max_concurrent_requests": 1 }
    })))
    .await;
    assert_eq!(status, 200);
    let big: Vec<f32> = vec![0.5; 64 * 64];
    let big =
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [64, 64], "data": big}]});
    let mut refused = 0;
    for _ in 0..5 {
        let mut calls = Vec::new();
        for _ in 0..8 {
            let request = client_with_key(&key)
                .post(server.url("/v2/models/mlp/infer"))
                .json(&big);
            calls.push(tokio::spawn(async move {
                let response = request.send().await.unwrap();
                let retry_after = response.headers().get("retry-after").cloned();
                (response.status().as_u16(), retry_after)
            }));
        }
        for call in calls {
            let (status, retry_after) = call.await.unwrap();
            assert!(status == 200 || status == 429, "{status}");
            if status == 429 {
                assert_eq!(retry_after.unwrap().to_str().unwrap(), "1");
            }
            refused += usize::from(status == 429);
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "8 concurrent requests never hit a limit of 1");
    assert_eq!(infer(&server, &key, "mlp").await.0, 200);

    // Storage quota: 403 with the limit named, nothing stored.
    let (status, _) = send(
        admin()
            .patch(server.url("/api/v1/tenants/small"))
            .json(&json!({
                "quotas": { "max_models": 1 }
            })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        push_model(&server, &key, "m", 1, MLP_CONFIG, &mlp_onnx())
            .await
            .0,
        201
    );
    let (status, body) = push_model(&server, &key, "m", 2, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("quota of 1 model versions"),
        "{body}"
    );
    // Deleting frees the quota and the disk at once (not at the next restart), so
    // delete-and-push cannot grow the store past the quota.
    let onnx_blob = server
        .data_dir()
        .join("store/blobs/sha256")
        .join(weft_store::signing::sha256_hex(&mlp_onnx()));
    assert!(onnx_blob.exists());
    let (status, body) = send(client_with_key(&key).delete(server.url("/api/v1/models/m"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !onnx_blob.exists(),
        "the deleted version's bytes are still on disk"
    );
    let (status, body) = push_model(&server, &key, "m", 2, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 201, "{body}");
    assert!(onnx_blob.exists());
    // An upload larger than what is left of the storage quota is refused while it streams
    // (before the server holds it), with the quota named.
    let stored = send(client_with_key(&key).get(server.url("/api/v1/tenant")))
        .await
        .1["usage"]["stored_bytes"]
        .as_u64()
        .unwrap();
    let (status, body) = send(
        admin()
            .patch(server.url("/api/v1/tenants/small"))
            .json(&json!({
                "quotas": { "max_models": 10, "max_stored_bytes": stored + 100 }
            })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = push_model(&server, &key, "m", 3, MLP_CONFIG, &mlp_onnx()).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("is larger than the 100 bytes left"),
        "{body}"
    );
    // Request size quota.
    let (status, _) = send(
        admin()
            .patch(server.url("/api/v1/tenants/small"))
            .json(&json!({
                "quotas": { "max_request_bytes": 100 }
            })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(infer(&server, &key, "mlp").await.0, 413);
    let (status, body) = send(
        admin()
            .patch(server.url("/api/v1/tenants/small"))
            .json(&json!({
                "quotas": { "burst": 0 }
            })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

/// Everything a tenant pushed is back after a restart (and compiled plugins come from the
/// compile cache); a stored blob altered on disk is refused at load, not served.
#[tokio::test]
async fn a_restart_restores_every_tenant_and_refuses_tampered_blobs() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let (a, b) = two_tenants(&server).await;
    let (_, before) = infer(&server, &a, "secret-graph").await;
    let data = server.crash();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let (status, after) = infer(&server, &a, "secret-graph").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(before["outputs"], after["outputs"]);
    assert_eq!(infer(&server, &b, "secret-graph").await.0, 404);

    // A second server on the same --data-dir refuses to start (its start-up garbage collection
    // would delete the first one's uncommitted blobs), and the first keeps serving.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_weft-under-test"))
        .args(["serve", "--listen", "127.0.0.1:0", "--ort-library"])
        .arg(ort_library())
        .arg("--repository")
        .arg(repo.path())
        .arg("--data-dir")
        .arg(server.data_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another weft process"),
        "{stderr}"
    );
    assert_eq!(infer(&server, &a, "secret-graph").await.0, 200);

    // The plugins came back from the compile cache, not from a fresh compile.
    let metrics = scrape(&server).await;
    let lookups = |result: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "weft_compile_cache_lookups_total{{result=\"{result}\"}}"
                ))
            })
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0.0)
    };
    assert!(lookups("hit") >= 2.0 && lookups("miss") == 0.0, "{metrics}");
    assert!(
        metrics.contains("weft_plugin_calls_total{plugin=\"acme/normalize@1.0.0\"} 2"),
        "{metrics}"
    );

    // Tamper with the stored normalize component: after a restart the graph is unavailable
    // with a reason, and nothing crashes.
    let digest = weft_store::signing::sha256_hex(&guest("normalize"));
    let blob = server.data_dir().join("store/blobs/sha256").join(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    let data = server.crash();
    std::fs::write(
        data.path().join("data/store/blobs/sha256").join(&digest),
        &bytes,
    )
    .unwrap();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let (status, body) = infer(&server, &a, "secret-graph").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(infer(&server, &a, "secret-mlp").await.0, 200);
}

/// SIGKILL at random moments of a stream of uploads: after each restart every upload that was
/// answered 201 is there and serves, and nothing half-written is visible.
#[tokio::test]
async fn sigkill_during_uploads_leaves_the_old_or_the_new_state_never_half() {
    let repo = platform_repo();
    let mut server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let secret = signing_key(&server, &key).await;
    let mut confirmed: Vec<u64> = Vec::new();
    let onnx = mlp_onnx();
    let plugin = guest("normalize");
    let mut version = 0u64;
    // Kill times are random per run (the seed is in every failure message, to replay a run).
    let seed = std::env::var("WEFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
                | 1
        });
    let mut state = seed;
    let mut next_delay = move || {
        // xorshift64: 50–1200 ms into the stream of uploads.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        50 + state % 1150
    };
    for round in 0..6u64 {
        let address = server.address.clone();
        let uploads = {
            let key = key.clone();
            let onnx = onnx.clone();
            let plugin = plugin.clone();
            let signature_key = Signer {
                secret: SecretKey::from_file_text(&secret.secret.to_file_text()).unwrap(),
                tenant: secret.tenant.clone(),
            };
            let first = version + 1;
            tokio::spawn(async move {
                let mut done = Vec::new();
                for v in first.. {
                    let mut body = MLP_CONFIG.as_bytes().to_vec();
                    body.extend_from_slice(&onnx);
                    let model = client_with_key(&key)
                        .put(format!("http://{address}/api/v1/models/m/versions/{v}"))
                        .header("Weft-Config-Length", MLP_CONFIG.len().to_string())
                        .body(body)
                        .send()
                        .await;
                    let signature = signature_key.sign_plugin(&plugin, "p", &v.to_string());
                    let pushed = client_with_key(&key)
                        .put(format!("http://{address}/api/v1/plugins/p/versions/{v}"))
                        .header("Weft-Signature", signature.signature)
                        .header("Weft-Signing-Key", signature.key_id)
                        .body(plugin.clone())
                        .send()
                        .await;
                    match (model, pushed) {
                        (Ok(m), Ok(p)) if m.status() == 201 && p.status() == 201 => done.push(v),
                        _ => return done,
                    }
                }
                done
            })
        };
        let delay = next_delay();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let data = server.crash();
        let done = uploads.await.unwrap();
        confirmed.extend(&done);
        version = confirmed.iter().copied().max().unwrap_or(version) + 10;
        server = Server::try_start_in(repo.path(), &[], data).unwrap();
        let (status, models) =
            send(client_with_key(&key).get(server.url("/api/v1/models/m"))).await;
        let (_, plugins) = send(client_with_key(&key).get(server.url("/api/v1/plugins/p"))).await;
        let listed = |value: &Value| -> Vec<u64> {
            value["versions"]
                .as_array()
                .map(|versions| {
                    versions
                        .iter()
                        .map(|v| v["version"].as_str().unwrap().parse().unwrap())
                        .collect()
                })
                .unwrap_or_default()
        };
        let models_listed = if status == 200 {
            listed(&models)
        } else {
            Vec::new()
        };
        for v in &confirmed {
            assert!(
                models_listed.contains(v),
                "seed {seed} round {round}: confirmed model version {v} lost: {models_listed:?}"
            );
            assert!(
                listed(&plugins).contains(v),
                "seed {seed} round {round}: confirmed plugin version {v} lost"
            );
        }
        // Every listed version serves (no half-written blob behind a record).
        for v in &models_listed {
            let (status, body) = send(
                client_with_key(&key)
                    .post(server.url(&format!("/v2/models/m/versions/{v}/infer")))
                    .json(&row()),
            )
            .await;
            assert_eq!(
                status, 200,
                "seed {seed} round {round}: listed version {v} does not serve: {body}"
            );
        }
        // Every listed plugin version's bytes are whole: the blob hashes to its digest.
        for listed in plugins["versions"].as_array().into_iter().flatten() {
            let digest = listed["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:");
            let bytes = std::fs::read(server.data_dir().join("store/blobs/sha256").join(digest))
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: blob {digest}: {e}"));
            assert_eq!(
                weft_store::signing::sha256_hex(&bytes),
                digest,
                "seed {seed} round {round}: plugin {listed} has a torn blob"
            );
        }
        let store = server.data_dir().join("store");
        let leftovers: Vec<_> = walk(&store)
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "seed {seed}: temp files survived a restart: {leftovers:?}"
        );
    }
    assert!(
        !confirmed.is_empty(),
        "no upload completed before the kills; the test proved nothing"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Replacing a model version, a plugin version and a graph version while a steady load runs:
/// not one request fails, and new requests see the new versions.
#[tokio::test]
async fn hot_swap_under_load_fails_no_request() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let key = create_tenant(&server, "acme", json!({ "shared_models": ["mlp"] })).await;
    let secret = signing_key(&server, &key).await;
    push_plugin(&server, &key, &secret, "normalize", "1", guest("normalize")).await;
    push_plugin(&server, &key, &secret, "softmax", "1", guest("softmax")).await;
    assert_eq!(
        push_model(&server, &key, "scorer", 1, MLP_CONFIG, &mlp_onnx())
            .await
            .0,
        201
    );
    assert_eq!(
        apply_graph(
            &server,
            &key,
            "classify",
            &classify_graph("classify", 1, "scorer")
        )
        .await
        .0,
        201
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let url = server.url(if worker % 2 == 0 {
            "/v2/models/classify/infer"
        } else {
            "/v2/models/scorer/infer"
        });
        let key = key.clone();
        let stop = std::sync::Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let client = client_with_key(&key);
            let (mut ok, mut failed, mut versions) =
                (0u64, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = client.post(&url).json(&row()).send().await.unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                if status == 200 {
                    ok += 1;
                    versions.insert(body["model_version"].as_str().unwrap().to_string());
                } else {
                    failed.push(format!("{status}: {body}"));
                }
            }
            (ok, failed, versions)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        push_model(&server, &key, "scorer", 2, MLP_CONFIG, &mlp_onnx())
            .await
            .0,
        201
    );
    assert_eq!(
        push_plugin(&server, &key, &secret, "normalize", "2", guest("normalize"))
            .await
            .0,
        201
    );
    assert_eq!(
        apply_graph(
            &server,
            &key,
            "classify",
            &classify_graph("classify", 2, "scorer")
        )
        .await
        .0,
        201
    );
    assert_eq!(
        send(client_with_key(&key).delete(server.url("/api/v1/models/scorer/versions/1")))
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for worker in workers {
        let (ok, failed, versions) = worker.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during hot swap: {failed:?}"
        );
        total += ok;
        seen.extend(versions);
    }
    assert!(
        total > 20,
        "only {total} requests in {:?}",
        started.elapsed()
    );
    assert!(
        seen.contains("1") && seen.contains("2"),
        "both versions served: {seen:?}"
    );
    let (_, after) = infer(&server, &key, "scorer").await;
    assert_eq!(after["model_version"], "2");
}

/// Writes a store, before any server runs on it, where tenants `acme` and `bolt` both hold one
/// signing key (state from before keys were unique across tenants) and `acme` holds the
/// `normalize` and `softmax` plugins signed under the retired v1 scheme (stored before
/// signatures named the tenant). Returns the data directory, both API keys and the key.
fn legacy_store() -> (tempfile::TempDir, String, String, SecretKey) {
    use weft_store::{ApiKey, PluginVersion, Quotas, SigningKey, Store, Tenant, api_keys};
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(&data.path().join("data")).unwrap();
    let secret = SecretKey::generate().unwrap();
    let v1 = |digest: &str, name: &str, version: &str| {
        secret.sign(format!("weft-plugin-signature-v1\n{digest}\n{name}\n{version}").as_bytes())
    };
    let mut keys = Vec::new();
    let mut tenants = Vec::new();
    for name in ["acme", "bolt"] {
        let (id, key) = api_keys::generate().unwrap();
        let mut tenant = Tenant::new(name, 0, Quotas::default());
        tenant.shared_models = vec!["mlp".into()];
        tenant.api_keys.push(ApiKey {
            id,
            hash: api_keys::hash(&key),
            created_unix: 0,
            revoked: false,
        });
        tenant.signing_keys.push(SigningKey {
            id: secret.public().key_id(),
            public_key: secret.public().to_base64(),
            created_unix: 0,
            revoked: false,
        });
        keys.push(key);
        tenants.push(tenant);
    }
    for plugin in ["normalize", "softmax"] {
        let bytes = guest(plugin);
        let digest = store.put_blob(&bytes).unwrap();
        let record: PluginVersion = serde_json::from_value(json!({
            "version": "1.0.0", "digest": digest, "size": bytes.len(),
            "signature": v1(&digest, plugin, "1.0.0"), "key_id": secret.public().key_id(),
            "created_unix": 0,
        }))
        .unwrap();
        tenants[0].plugins.insert(plugin.into(), vec![record]);
    }
    store
        .transact(|state| {
            for tenant in tenants {
                state.tenants.insert(tenant.name.clone(), tenant);
            }
            Ok(())
        })
        .unwrap();
    drop(store);
    let bolt = keys.pop().unwrap();
    let acme = keys.pop().unwrap();
    (data, acme, bolt, secret)
}

/// Signatures name the tenant: with one key held by two tenants, a plugin one tenant signed
/// cannot be pushed by the other, v1 signatures (no tenant) are refused with a reason, and
/// versions stored under v1 before the change still load.
#[tokio::test]
async fn a_signature_for_one_tenant_is_refused_for_another_even_with_the_same_key() {
    let repo = platform_repo();
    let (data, acme, bolt, secret) = legacy_store();
    let server = Server::try_start_in(repo.path(), &[], data).unwrap();
    let key_id = secret.public().key_id();

    // acme's v1-signed versions, stored before tenant binding, load and serve.
    let (status, body) = apply_graph(
        &server,
        &acme,
        "classify",
        &classify_graph("classify", 1, "mlp"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(infer(&server, &acme, "classify").await.0, 200);

    // acme signs and pushes a new version for itself.
    let bytes = guest("normalize");
    let for_acme = secret.sign_plugin(&bytes, "acme", "normalize", "2.0.0");
    let (status, body) = push_signed(
        &server,
        &acme,
        "normalize",
        "2.0.0",
        bytes.clone(),
        Some((&for_acme.signature, &key_id)),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // bolt replays acme's signature with the key they share: refused, naming only bolt.
    let (status, body) = push_signed(
        &server,
        &bolt,
        "normalize",
        "2.0.0",
        bytes.clone(),
        Some((&for_acme.signature, &key_id)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("does not verify"), "{error}");
    assert!(error.contains("tenant 'bolt'"), "{error}");
    assert!(!error.contains("acme"), "{error}");

    // A v1 signature (no tenant) is refused by either tenant, saying to sign again.
    let digest = weft_store::signing::sha256_hex(&bytes);
    let v1 =
        secret.sign(format!("weft-plugin-signature-v1\n{digest}\nnormalize\n3.0.0").as_bytes());
    for (tenant, key) in [("acme", &acme), ("bolt", &bolt)] {
        let (status, body) = push_signed(
            &server,
            key,
            "normalize",
            "3.0.0",
            bytes.clone(),
            Some((&v1, &key_id)),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("weft-plugin-signature-v1"), "{error}");
        assert!(error.contains(&format!("--tenant {tenant}")), "{error}");
    }
    let (_, listed) = send(client_with_key(&bolt).get(server.url("/api/v1/plugins"))).await;
    assert_eq!(listed, json!({"plugins": []}), "bolt stored something");

    // Signed for bolt, the same bytes are bolt's to push.
    let for_bolt = secret.sign_plugin(&bytes, "bolt", "normalize", "2.0.0");
    let (status, body) = push_signed(
        &server,
        &bolt,
        "normalize",
        "2.0.0",
        bytes,
        Some((&for_bolt.signature, &key_id)),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

/// A public key registered by one tenant cannot be registered by another, revoked or not, and
/// the refusal does not say who holds it.
#[tokio::test]
async fn a_signing_key_registered_by_one_tenant_is_refused_for_another() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let acme = create_tenant(&server, "acme", json!({})).await;
    let bolt = create_tenant(&server, "bolt", json!({})).await;
    let signer = signing_key(&server, &acme).await;

    // bolt holds the secret too (so it can prove possession): still refused.
    let (status, body, _) = register_key(&server, &bolt, &signer.secret).await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("this public key is already registered"),
        "{error}"
    );
    assert!(!error.contains("acme"), "{error}");
    // acme registering it again is a conflict too.
    let (status, body, _) = register_key(&server, &acme, &signer.secret).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("is already registered"),
        "{body}"
    );
    // Revoked, it stays taken: for acme and for everyone else.
    let id = signer.public().key_id();
    let (status, _) =
        send(client_with_key(&acme).delete(server.url(&format!("/api/v1/signing-keys/{id}"))))
            .await;
    assert_eq!(status, 200);
    let (status, body, _) = register_key(&server, &bolt, &signer.secret).await;
    assert_eq!(status, 409, "{body}");
    let (status, body, _) = register_key(&server, &acme, &signer.secret).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    // bolt has no key; another tenant's key id is unknown to it (404, like any unknown id).
    let (_, listed) = send(client_with_key(&bolt).get(server.url("/api/v1/signing-keys"))).await;
    assert_eq!(listed, json!({"signing_keys": []}));
    let (status, _) =
        send(client_with_key(&bolt).delete(server.url(&format!("/api/v1/signing-keys/{id}"))))
            .await;
    assert_eq!(status, 404);
    // A fresh key is bolt's to register.
    signing_key(&server, &bolt).await;
}

/// Registering a key proves possession: it needs a challenge the server issued to this tenant,
/// not yet used, signed by the key being registered over this tenant's name.
#[tokio::test]
async fn key_registration_needs_a_fresh_challenge_signed_by_the_key() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let acme = create_tenant(&server, "acme", json!({})).await;
    let bolt = create_tenant(&server, "bolt", json!({})).await;
    let secret = SecretKey::generate().unwrap();
    let public_key = secret.public().to_base64();
    let register = |body: Value| {
        let request = client_with_key(&acme)
            .post(server.url("/api/v1/signing-keys"))
            .json(&body);
        async move { send(request).await }
    };

    let issued = challenge(&server, &acme).await;
    assert_eq!(issued["tenant"], "acme");
    assert_eq!(issued["challenge"].as_str().unwrap().len(), 64);
    assert_eq!(issued["expires_in_s"], 300);
    let nonce = issued["challenge"].as_str().unwrap().to_string();

    // No proof at all: refused, saying how to prove possession.
    let (status, body) = register(json!({ "public_key": public_key })).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("POST /api/v1/signing-keys/challenge"),
        "{body}"
    );
    // A challenge never issued, or issued to another tenant.
    let bolts = challenge(&server, &bolt).await["challenge"]
        .as_str()
        .unwrap()
        .to_string();
    for wrong in ["0".repeat(64), bolts] {
        let (status, body) = register(json!({
            "public_key": public_key,
            "challenge": wrong,
            "signature": secret.sign_key_registration("acme", &wrong),
        }))
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("unknown or already used challenge"),
            "{body}"
        );
    }
    // Signed by another key, or over another tenant's name: does not verify, and the attempt
    // spends the challenge.
    let other = SecretKey::generate().unwrap();
    for (proof, nonce) in [
        (other.sign_key_registration("acme", &nonce), nonce.clone()),
        {
            let fresh = challenge(&server, &acme).await["challenge"]
                .as_str()
                .unwrap()
                .to_string();
            (secret.sign_key_registration("bolt", &fresh), fresh)
        },
    ] {
        let (status, body) = register(json!({
            "public_key": public_key, "challenge": nonce, "signature": proof,
        }))
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("does not verify"),
            "{body}"
        );
        let (status, body) = register(json!({
            "public_key": public_key,
            "challenge": nonce,
            "signature": secret.sign_key_registration("acme", &nonce),
        }))
        .await;
        assert_eq!(status, 400, "a refused attempt spent the challenge: {body}");
    }
    let (_, listed) = send(client_with_key(&acme).get(server.url("/api/v1/signing-keys"))).await;
    assert_eq!(listed, json!({"signing_keys": []}));

    // The right proof lands once; the challenge is then spent.
    let (status, body, tenant) = register_key(&server, &acme, &secret).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(tenant, "acme");
    let nonce = challenge(&server, &acme).await["challenge"]
        .as_str()
        .unwrap()
        .to_string();
    let next = SecretKey::generate().unwrap();
    let body = json!({
        "public_key": next.public().to_base64(),
        "challenge": nonce,
        "signature": next.sign_key_registration("acme", &nonce),
    });
    assert_eq!(register(body.clone()).await.0, 201);
    let (status, answer) = register(body).await;
    assert_eq!(status, 400, "{answer}");
    // Malformed input is a 400 naming what is wrong.
    let (status, body) =
        register(json!({"public_key": "AAAA", "challenge": "x", "signature": "y"})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("public key"),
        "{body}"
    );
    let (status, _) = register(json!({"public_key": public_key, "extra": 1})).await;
    assert_eq!(status, 400);
}

/// `max_signing_keys` bounds a tenant's keys (revoked ones count: they are kept forever).
#[tokio::test]
async fn signing_keys_have_a_count_quota() {
    let repo = platform_repo();
    let server = Server::start(repo.path());
    let acme = create_tenant(&server, "acme", json!({"quotas": {"max_signing_keys": 2}})).await;
    let first = signing_key(&server, &acme).await;
    // Two challenges while there is room for one more key: the second registration is refused
    // by the store's own check.
    let (a, b) = (
        SecretKey::generate().unwrap(),
        SecretKey::generate().unwrap(),
    );
    let issued = [
        challenge(&server, &acme).await,
        challenge(&server, &acme).await,
    ];
    for (i, (secret, issued)) in [&a, &b].into_iter().zip(&issued).enumerate() {
        let nonce = issued["challenge"].as_str().unwrap();
        let (status, body) = send(
            client_with_key(&acme)
                .post(server.url("/api/v1/signing-keys"))
                .json(&json!({
                    "public_key": secret.public().to_base64(),
                    "challenge": nonce,
                    "signature": secret.sign_key_registration("acme", nonce),
                })),
        )
        .await;
        if i == 0 {
            assert_eq!(status, 201, "{body}");
        } else {
            assert_eq!(status, 403, "{body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains("quota of 2 signing keys"), "{error}");
            assert!(error.contains("max_signing_keys"), "{error}");
        }
    }
    // At the quota, even a challenge is refused; revoking does not free room.
    let (status, body) =
        send(client_with_key(&acme).post(server.url("/api/v1/signing-keys/challenge"))).await;
    assert_eq!(status, 403, "{body}");
    let id = first.public().key_id();
    let (status, _) =
        send(client_with_key(&acme).delete(server.url(&format!("/api/v1/signing-keys/{id}"))))
            .await;
    assert_eq!(status, 200);
    let (status, body) =
        send(client_with_key(&acme).post(server.url("/api/v1/signing-keys/challenge"))).await;
    assert_eq!(status, 403, "revoked keys still count: {body}");
    let (_, tenant) = send(admin().get(server.url("/api/v1/tenants/acme"))).await;
    assert_eq!(tenant["usage"]["signing_keys"], 2);
    assert_eq!(tenant["quotas"]["max_signing_keys"], 2);
    // The operator raises it.
    let (status, body) = send(
        admin()
            .patch(server.url("/api/v1/tenants/acme"))
            .json(&json!({"quotas": {"max_signing_keys": 3}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = register_key(&server, &acme, &b).await;
    assert_eq!(status, 201, "{body}");
}
