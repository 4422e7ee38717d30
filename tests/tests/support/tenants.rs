//! Tenant helpers for end-to-end tests: the operator's client, creating tenants, registering
//! signing keys, pushing signed plugins and models, applying graphs, and inference with a key.

use serde_json::{Value, json};
use weft_store::signing::{PluginSignature, PublicKey, SecretKey};

use super::*;

/// The operator's client.
pub fn admin() -> reqwest::Client {
    client_with_key(ADMIN_KEY)
}

pub async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Creates a tenant and returns its first API key.
pub async fn create_tenant(server: &Server, name: &str, body: Value) -> String {
    let mut body = body;
    body["name"] = json!(name);
    let (status, created) = send(admin().post(server.url("/api/v1/tenants")).json(&body)).await;
    assert_eq!(status, 201, "{created}");
    created["api_key"]["key"].as_str().unwrap().to_string()
}

/// A registered signing key and the tenant it signs for (plugin signatures name the tenant).
pub struct Signer {
    pub secret: SecretKey,
    pub tenant: String,
}

impl Signer {
    /// Signs a component for this signer's tenant.
    pub fn sign_plugin(&self, component: &[u8], name: &str, version: &str) -> PluginSignature {
        self.secret
            .sign_plugin(component, &self.tenant, name, version)
    }

    pub fn public(&self) -> PublicKey {
        self.secret.public()
    }
}

/// Asks for a key registration challenge; returns the answer (`challenge`, `tenant`, ...).
pub async fn challenge(server: &Server, key: &str) -> Value {
    let (status, body) =
        send(client_with_key(key).post(server.url("/api/v1/signing-keys/challenge"))).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// Registers `secret` for the tenant of `key` the way `weft key register` does: a challenge,
/// then the public key with a signature over the registration message. Returns the answer and
/// the tenant's name (from the challenge).
pub async fn register_key(server: &Server, key: &str, secret: &SecretKey) -> (u16, Value, String) {
    let issued = challenge(server, key).await;
    let nonce = issued["challenge"].as_str().unwrap();
    let tenant = issued["tenant"].as_str().unwrap().to_string();
    let (status, body) = send(
        client_with_key(key)
            .post(server.url("/api/v1/signing-keys"))
            .json(&json!({
                "public_key": secret.public().to_base64(),
                "challenge": nonce,
                "signature": secret.sign_key_registration(&tenant, nonce),
            })),
    )
    .await;
    (status, body, tenant)
}

/// Generates a signing key and registers it for the tenant.
pub async fn signing_key(server: &Server, key: &str) -> Signer {
    let secret = SecretKey::generate().unwrap();
    let (status, body, tenant) = register_key(server, key, &secret).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], json!(secret.public().key_id()));
    Signer { secret, tenant }
}

pub fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guests().join(format!("{name}.wasm"))).unwrap()
}

/// PUTs a plugin with the given signature headers.
pub async fn push_signed(
    server: &Server,
    key: &str,
    name: &str,
    version: &str,
    bytes: Vec<u8>,
    signature: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut request = client_with_key(key)
        .put(server.url(&format!("/api/v1/plugins/{name}/versions/{version}")))
        .body(bytes);
    if let Some((signature, key_id)) = signature {
        request = request
            .header("Weft-Signature", signature)
            .header("Weft-Signing-Key", key_id);
    }
    send(request).await
}

pub async fn push_plugin(
    server: &Server,
    key: &str,
    secret: &Signer,
    name: &str,
    version: &str,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let signature = secret.sign_plugin(&bytes, name, version);
    push_signed(
        server,
        key,
        name,
        version,
        bytes,
        Some((&signature.signature, &signature.key_id)),
    )
    .await
}

/// Signs and pushes the `normalize` and `softmax` plugins (what [`classify_graph`] calls) at
/// `version`, asserting both are accepted.
pub async fn push_classify_plugins(server: &Server, key: &str, secret: &Signer, version: &str) {
    for plugin in ["normalize", "softmax"] {
        let (status, body) = push_plugin(server, key, secret, plugin, version, guest(plugin)).await;
        assert_eq!(status, 201, "{plugin}: {body}");
    }
}

pub async fn push_model(
    server: &Server,
    key: &str,
    name: &str,
    version: u64,
    config: &str,
    onnx: &[u8],
) -> (u16, Value) {
    let mut body = config.as_bytes().to_vec();
    body.extend_from_slice(onnx);
    send(
        client_with_key(key)
            .put(server.url(&format!("/api/v1/models/{name}/versions/{version}")))
            .header("Weft-Config-Length", config.len().to_string())
            .body(body),
    )
    .await
}

pub async fn apply_graph(server: &Server, key: &str, name: &str, toml: &str) -> (u16, Value) {
    send(
        client_with_key(key)
            .put(server.url(&format!("/api/v1/graphs/{name}")))
            .body(toml.to_string()),
    )
    .await
}

pub fn mlp_onnx() -> Vec<u8> {
    std::fs::read(quickstart().join("models/mlp/1/model.onnx")).unwrap()
}

pub const MLP_CONFIG: &str = "platform = \"onnx\"\nmax_batch_size = 64\n";

/// The classify example's graph with its model node pointing at `model`.
pub fn classify_graph(name: &str, version: u64, model: &str) -> String {
    let text = std::fs::read_to_string(example("classify").join("graphs/classify.toml")).unwrap();
    text.replace("name = \"classify\"", &format!("name = \"{name}\""))
        .replace("version = 1", &format!("version = {version}"))
        .replace("model = \"mlp\"", &format!("model = \"{model}\""))
}

pub fn row() -> Value {
    let x: Vec<f32> = (0..64).map(|i| i as f32 / 10.0).collect();
    json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": x}]})
}

pub async fn infer(server: &Server, key: &str, model: &str) -> (u16, Value) {
    send(
        client_with_key(key)
            .post(server.url(&format!("/v2/models/{model}/infer")))
            .json(&row()),
    )
    .await
}
