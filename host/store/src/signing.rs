//! Ed25519 plugin signing: key pairs, their file formats, and the exact bytes a plugin signature
//! and a key registration cover.
//!
//! This module owns the signing *scheme* so that the CLI that signs (`weft plugin sign`) and the
//! server that verifies (`PUT /api/v1/plugins/...`) cannot drift apart: both build the signed
//! message with [`plugin_message`], which binds the component's sha256 digest to the tenant it is
//! pushed to and to the plugin's name and version (a signature for `acme`'s `resize@1.0` is
//! useless for `resize@2.0`, for `crop`, and for any other tenant that holds the same key).
//! The first scheme (`weft-plugin-signature-v1`) did not name the tenant; uploads signed with it
//! are refused with a message saying to sign again ([`PublicKey::verify_plugin_upload`]), and only
//! plugin versions stored before the change still load under it ([`SignatureScheme::V1`]).
//!
//! A key is registered only with proof that the registrant holds its secret half: a signature
//! over [`key_registration_message`] (the tenant, a single-use server challenge and the public
//! key). Its first line differs from a plugin signature's, so neither can stand in for the other.
//!
//! Messages are a first line naming the scheme, then `name:length:value\n` fields in a fixed
//! order, so no choice of values (a name holding a newline, say) makes two different field sets
//! sign the same bytes. Verification is strict ([`ed25519_dalek::VerifyingKey::verify_strict`]):
//! non-canonical and small-order signatures and keys are rejected. Every malformed input is an
//! [`ErrorKind::InvalidArgument`](weft_core::ErrorKind::InvalidArgument) error, never a panic, and
//! no error message or `Debug` output ever contains secret key material.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use weft_core::{Error, Result};

/// The `kind` of a secret key file.
pub const SECRET_KEY_KIND: &str = "weft-ed25519-secret-key";
/// The `kind` of a public key file.
pub const PUBLIC_KEY_KIND: &str = "weft-ed25519-public-key";
/// The first line of every signed plugin message of the current scheme (tenant-bound).
const PLUGIN_MESSAGE_PREFIX: &[u8] = b"weft-plugin-signature-v2\n";
/// The first line of the retired scheme, which did not name the tenant.
const PLUGIN_MESSAGE_V1_PREFIX: &[u8] = b"weft-plugin-signature-v1\n";
/// The first line of every key registration message.
const KEY_REGISTRATION_PREFIX: &[u8] = b"weft-key-registration-v1\n";

/// Lowercase hex sha256 of `bytes` (64 characters).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A fresh single-use nonce for a key registration challenge: 32 bytes from the operating
/// system's random number generator, as 64 lowercase hex characters.
pub fn challenge_nonce() -> Result<String> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| {
        Error::internal(format!(
            "cannot read the operating system's random number generator: {e}"
        ))
    })?;
    Ok(hex(&nonce))
}

/// Whether `text` looks like a [`sha256_hex`] result: exactly 64 lowercase hex characters.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Appends one `name:length:value\n` field: the length makes the encoding unambiguous whatever
/// the value holds.
fn push_field(message: &mut Vec<u8>, name: &str, value: &str) {
    message.extend_from_slice(name.as_bytes());
    message.push(b':');
    message.extend_from_slice(value.len().to_string().as_bytes());
    message.push(b':');
    message.extend_from_slice(value.as_bytes());
    message.push(b'\n');
}

/// The exact bytes signed for a plugin pushed to `tenant`:
/// `"weft-plugin-signature-v2\n"`, then the fields `tenant`, `plugin`, `version` and `sha256`
/// (lowercase hex of the component), each as `name:length:value\n`, e.g.
/// `tenant:4:acme\nplugin:6:resize\nversion:5:1.0.0\nsha256:64:<hex>\n`.
pub fn plugin_message(tenant: &str, digest_hex: &str, name: &str, version: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(
        PLUGIN_MESSAGE_PREFIX.len()
            + tenant.len()
            + digest_hex.len()
            + name.len()
            + version.len()
            + 64,
    );
    message.extend_from_slice(PLUGIN_MESSAGE_PREFIX);
    push_field(&mut message, "tenant", tenant);
    push_field(&mut message, "plugin", name);
    push_field(&mut message, "version", version);
    push_field(&mut message, "sha256", digest_hex);
    message
}

/// The retired first scheme's message, `"weft-plugin-signature-v1\n" + digest + "\n" + name +
/// "\n" + version`: no tenant. Only for recognising (and refusing) such signatures, and for
/// plugin versions stored before tenant binding.
fn plugin_message_v1(digest_hex: &str, name: &str, version: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(
        PLUGIN_MESSAGE_V1_PREFIX.len() + digest_hex.len() + name.len() + version.len() + 2,
    );
    message.extend_from_slice(PLUGIN_MESSAGE_V1_PREFIX);
    message.extend_from_slice(digest_hex.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(name.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(version.as_bytes());
    message
}

/// The exact bytes a key's holder signs to register it for `tenant`:
/// `"weft-key-registration-v1\n"`, then the fields `tenant`, `challenge` (the server's
/// single-use nonce) and `public_key` (standard base64 of the 32 key bytes), each as
/// `name:length:value\n`.
pub fn key_registration_message(tenant: &str, challenge: &str, public_key_b64: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(
        KEY_REGISTRATION_PREFIX.len() + tenant.len() + challenge.len() + public_key_b64.len() + 48,
    );
    message.extend_from_slice(KEY_REGISTRATION_PREFIX);
    push_field(&mut message, "tenant", tenant);
    push_field(&mut message, "challenge", challenge);
    push_field(&mut message, "public_key", public_key_b64);
    message
}

/// Which message a stored plugin signature covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureScheme {
    /// `weft-plugin-signature-v1`: digest, name and version, no tenant. Refused at upload;
    /// the default only so that versions stored before tenant binding keep loading.
    #[default]
    V1,
    /// `weft-plugin-signature-v2` ([`plugin_message`]): tenant, name, version and digest.
    V2,
}

/// An ed25519 secret (signing) key. `Debug` shows only the key id; the secret is zeroed on drop.
#[derive(Clone)]
pub struct SecretKey {
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("key_id", &self.public().key_id())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct SecretKeyFile {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    secret_key: String,
}

#[derive(Serialize, Deserialize)]
struct PublicKeyFile {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    public_key: String,
}

impl SecretKey {
    /// A fresh key whose 32-byte seed comes from the operating system's random number generator.
    pub fn generate() -> Result<SecretKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| {
            Error::internal(format!(
                "cannot read the operating system's random number generator: {e}"
            ))
        })?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey { key })
    }

    /// The matching public (verifying) key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message`; returns the 64-byte signature as standard padded base64.
    pub fn sign(&self, message: &[u8]) -> String {
        BASE64.encode(self.key.sign(message).to_bytes())
    }

    /// Signs a plugin component for `tenant`: hashes it and signs [`plugin_message`].
    pub fn sign_plugin(
        &self,
        component: &[u8],
        tenant: &str,
        name: &str,
        version: &str,
    ) -> PluginSignature {
        let digest = sha256_hex(component);
        let signature = self.sign(&plugin_message(tenant, &digest, name, version));
        PluginSignature {
            tenant: tenant.to_owned(),
            plugin: name.to_owned(),
            version: version.to_owned(),
            digest,
            key_id: self.public().key_id(),
            signature,
        }
    }

    /// Proves possession of this key to register it for `tenant`: signs
    /// [`key_registration_message`] with the server's `challenge`; returns base64.
    pub fn sign_key_registration(&self, tenant: &str, challenge: &str) -> String {
        self.sign(&key_registration_message(
            tenant,
            challenge,
            &self.public().to_base64(),
        ))
    }

    /// The key file text:
    /// `{"kind":"weft-ed25519-secret-key","key_id":..,"secret_key":"<b64 32-byte seed>"}`.
    pub fn to_file_text(&self) -> String {
        let file = SecretKeyFile {
            kind: SECRET_KEY_KIND.to_owned(),
            key_id: Some(self.public().key_id()),
            secret_key: BASE64.encode(self.key.to_bytes()),
        };
        to_json_text(&file)
    }

    /// Parses [`SecretKey::to_file_text`]'s format. If the file names a `key_id`, it must match.
    pub fn from_file_text(text: &str) -> Result<SecretKey> {
        // Errors below never quote the file's text: it holds a secret.
        let file: SecretKeyFile = serde_json::from_str(text).map_err(|e| {
            Error::invalid(format!(
                "not a weft secret key file (expected JSON with \"kind\": \"{SECRET_KEY_KIND}\"): \
                 line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if file.kind != SECRET_KEY_KIND {
            return Err(Error::invalid(format!(
                "not a weft secret key file: kind is {:?}, expected \"{SECRET_KEY_KIND}\"",
                file.kind
            )));
        }
        let bytes = BASE64
            .decode(file.secret_key.trim())
            .map_err(|_| Error::invalid("secret key file: \"secret_key\" is not valid base64"))?;
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "secret key file: \"secret_key\" must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        let key = SecretKey {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        };
        check_key_id(file.key_id.as_deref(), &key.public(), "secret key file")?;
        Ok(key)
    }
}

/// An ed25519 public (verifying) key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("key_id", &self.key_id())
            .field("public_key", &self.to_base64())
            .finish()
    }
}

impl PublicKey {
    /// Parses standard base64 of the 32 key bytes (surrounding whitespace allowed). Rejects text
    /// that is not base64, the wrong length, not a curve point, or a weak (small-order) key.
    pub fn from_base64(text: &str) -> Result<PublicKey> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|e| Error::invalid(format!("public key is not valid base64: {e}")))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "public key must be 32 bytes (44 base64 characters), got {} bytes",
                bytes.len()
            ))
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| Error::invalid("public key is not a valid ed25519 point"))?;
        if key.is_weak() {
            return Err(Error::invalid(
                "public key is a weak (small-order) ed25519 point",
            ));
        }
        Ok(PublicKey { key })
    }

    /// Standard padded base64 of the 32 key bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.key.as_bytes())
    }

    /// The first 16 hex characters of sha256 of the 32 key bytes.
    pub fn key_id(&self) -> String {
        let mut id = sha256_hex(self.key.as_bytes());
        id.truncate(16);
        id
    }

    /// Strictly verifies `signature_b64` (standard base64 of 64 bytes) over `message`.
    pub fn verify(&self, message: &[u8], signature_b64: &str) -> Result<()> {
        let bytes = BASE64
            .decode(signature_b64.trim())
            .map_err(|e| Error::invalid(format!("malformed signature: not valid base64: {e}")))?;
        let bytes: [u8; 64] = bytes.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "malformed signature: must be 64 bytes, got {}",
                bytes.len()
            ))
        })?;
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        self.key.verify_strict(message, &signature).map_err(|_| {
            Error::invalid(format!(
                "signature does not verify with signing key {}",
                self.key_id()
            ))
        })
    }

    /// Verifies a detached plugin signature file for a component whose digest is `digest_hex`,
    /// pushed to `tenant`: the file must name this key, this tenant, this digest, and the given
    /// name and version, and its signature must verify under the current scheme.
    pub fn verify_plugin(
        &self,
        signature: &PluginSignature,
        tenant: &str,
        digest_hex: &str,
        name: &str,
        version: &str,
    ) -> Result<()> {
        if signature.key_id != self.key_id() {
            return Err(Error::invalid(format!(
                "signature was made by key {}, not {}",
                signature.key_id,
                self.key_id()
            )));
        }
        if signature.tenant != tenant {
            return Err(Error::invalid(format!(
                "signature is for tenant {:?}, not {tenant:?}",
                signature.tenant
            )));
        }
        if signature.plugin != name || signature.version != version {
            return Err(Error::invalid(format!(
                "signature is for plugin {:?} version {:?}, not {name:?} version {version:?}",
                signature.plugin, signature.version
            )));
        }
        if signature.digest != digest_hex {
            return Err(Error::invalid(format!(
                "signature is for component digest {}, but the component's digest is {digest_hex}",
                signature.digest
            )));
        }
        self.verify_plugin_upload(&signature.signature, tenant, digest_hex, name, version)
    }

    /// Verifies an uploaded plugin's signature (base64) under the current scheme: over
    /// [`plugin_message`] for `tenant`, the uploading tenant. A signature that verifies only
    /// under the retired v1 scheme (no tenant) is refused with an error saying to sign again;
    /// one made for another tenant simply does not verify.
    pub fn verify_plugin_upload(
        &self,
        signature_b64: &str,
        tenant: &str,
        digest_hex: &str,
        name: &str,
        version: &str,
    ) -> Result<()> {
        let Err(error) = self.verify(
            &plugin_message(tenant, digest_hex, name, version),
            signature_b64,
        ) else {
            return Ok(());
        };
        if self
            .verify(&plugin_message_v1(digest_hex, name, version), signature_b64)
            .is_ok()
        {
            return Err(Error::invalid(format!(
                "signature uses the retired scheme weft-plugin-signature-v1, which does not name \
                 the tenant, and is no longer accepted: sign the plugin again for tenant \
                 '{tenant}' (`weft plugin sign --tenant {tenant} ...`)"
            )));
        }
        if error.message().starts_with("malformed") {
            return Err(error);
        }
        Err(Error::invalid(format!(
            "{}: it must sign tenant '{tenant}', plugin '{name}', version {version} and the \
             component's sha256 {digest_hex} (`weft plugin sign --tenant {tenant}`)",
            error.message()
        )))
    }

    /// Verifies a stored plugin version's signature under the scheme it was stored with.
    pub fn verify_stored_plugin(
        &self,
        scheme: SignatureScheme,
        signature_b64: &str,
        tenant: &str,
        digest_hex: &str,
        name: &str,
        version: &str,
    ) -> Result<()> {
        let message = match scheme {
            SignatureScheme::V2 => plugin_message(tenant, digest_hex, name, version),
            SignatureScheme::V1 => plugin_message_v1(digest_hex, name, version),
        };
        self.verify(&message, signature_b64)
    }

    /// Verifies a registration's proof of possession: `signature_b64` by this key over
    /// [`key_registration_message`] for `tenant` and `challenge`.
    pub fn verify_key_registration(
        &self,
        tenant: &str,
        challenge: &str,
        signature_b64: &str,
    ) -> Result<()> {
        self.verify(
            &key_registration_message(tenant, challenge, &self.to_base64()),
            signature_b64,
        )
        .map_err(|error| {
            if error.message().starts_with("malformed") {
                error
            } else {
                Error::invalid(format!(
                    "the registration signature does not verify with the public key being \
                     registered ({}): sign the registration message for tenant '{tenant}' and \
                     this challenge with that key's secret half (`weft key register` does)",
                    self.key_id()
                ))
            }
        })
    }

    /// The key file text: `{"kind":"weft-ed25519-public-key","key_id":..,"public_key":"<b64>"}`.
    pub fn to_file_text(&self) -> String {
        let file = PublicKeyFile {
            kind: PUBLIC_KEY_KIND.to_owned(),
            key_id: Some(self.key_id()),
            public_key: self.to_base64(),
        };
        to_json_text(&file)
    }

    /// Parses [`PublicKey::to_file_text`]'s format, or a bare base64 key.
    pub fn from_file_text(text: &str) -> Result<PublicKey> {
        let trimmed = text.trim();
        if !trimmed.starts_with('{') {
            return PublicKey::from_base64(trimmed);
        }
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| Error::invalid(format!("public key file is not valid JSON: {e}")))?;
        // Do not echo a secret key file that was passed by mistake.
        if value.get("kind").and_then(serde_json::Value::as_str) == Some(SECRET_KEY_KIND) {
            return Err(Error::invalid(
                "this is a secret key file; pass the public key file (.pub) instead",
            ));
        }
        let file: PublicKeyFile = serde_json::from_value(value).map_err(|e| {
            Error::invalid(format!(
                "not a weft public key file (expected JSON with \"kind\": \"{PUBLIC_KEY_KIND}\"): {e}"
            ))
        })?;
        if file.kind != PUBLIC_KEY_KIND {
            return Err(Error::invalid(format!(
                "not a weft public key file: kind is {:?}, expected \"{PUBLIC_KEY_KIND}\"",
                file.kind
            )));
        }
        let key = PublicKey::from_base64(&file.public_key)?;
        check_key_id(file.key_id.as_deref(), &key, "public key file")?;
        Ok(key)
    }
}

fn check_key_id(stated: Option<&str>, key: &PublicKey, what: &str) -> Result<()> {
    match stated {
        Some(id) if id != key.key_id() => Err(Error::invalid(format!(
            "{what}: \"key_id\" {id:?} does not match the key (its id is {}); the file is damaged",
            key.key_id()
        ))),
        _ => Ok(()),
    }
}

fn to_json_text<T: Serialize>(value: &T) -> String {
    // Serializing a struct of strings cannot fail; fall back to an empty object rather than panic.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| String::from("{}"));
    text.push('\n');
    text
}

/// A detached plugin signature file (`weft plugin sign` writes it, `weft plugin push` sends it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSignature {
    /// The tenant the plugin is signed for (the one that pushes it).
    pub tenant: String,
    /// The plugin's name.
    pub plugin: String,
    /// The plugin's version.
    pub version: String,
    /// Lowercase hex sha256 of the component bytes.
    pub digest: String,
    /// [`PublicKey::key_id`] of the signer.
    pub key_id: String,
    /// Standard base64 of the signature over [`plugin_message`].
    pub signature: String,
}

impl PluginSignature {
    /// Pretty JSON with a trailing newline.
    pub fn to_file_text(&self) -> String {
        to_json_text(self)
    }

    /// Parses [`PluginSignature::to_file_text`]'s format. A file without `"tenant"` was made
    /// for the retired v1 scheme: the error says to sign again.
    pub fn from_file_text(text: &str) -> Result<PluginSignature> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("not a weft plugin signature file: {e}")))?;
        if value.is_object() && value.get("tenant").is_none() && value.get("signature").is_some() {
            return Err(Error::invalid(
                "this signature file names no tenant: it was made for the retired scheme \
                 weft-plugin-signature-v1, which the server no longer accepts; sign the plugin \
                 again with `weft plugin sign --tenant <tenant>`",
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| Error::invalid(format!("not a weft plugin signature file: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use weft_core::ErrorKind;

    fn message() -> Vec<u8> {
        plugin_message("acme", &sha256_hex(b"component"), "resize", "1.0.0")
    }

    #[test]
    fn sha256_hex_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&sha256_hex(b"")));
        assert!(!is_sha256_hex(&sha256_hex(b"").to_uppercase()));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }

    #[test]
    fn plugin_message_layout() {
        assert_eq!(
            plugin_message("acme", "ab", "n", "v1.0"),
            b"weft-plugin-signature-v2\ntenant:4:acme\nplugin:1:n\nversion:4:v1.0\nsha256:2:ab\n"
                .to_vec()
        );
        assert_eq!(
            plugin_message_v1("ab", "n", "v"),
            b"weft-plugin-signature-v1\nab\nn\nv".to_vec()
        );
        assert_eq!(
            key_registration_message("acme", "c0ffee", "PK=="),
            b"weft-key-registration-v1\ntenant:4:acme\nchallenge:6:c0ffee\npublic_key:4:PK==\n"
                .to_vec()
        );
    }

    #[test]
    fn messages_of_different_fields_never_collide() {
        let digest = sha256_hex(b"component");
        let messages = [
            plugin_message("acme", &digest, "resize", "1.0"),
            plugin_message("acm", &digest, "eresize", "1.0"),
            plugin_message("acme\nplugin:6:resize", &digest, "x", "1.0"),
            plugin_message("acme", &digest, "resize\nversion:3:1.0", ""),
            plugin_message("", &digest, "resize", "1.0"),
            plugin_message_v1(&digest, "resize", "1.0"),
            key_registration_message("acme", &digest, "resize"),
        ];
        for (i, a) in messages.iter().enumerate() {
            for b in &messages[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let signature = secret.sign(&message());
        assert_eq!(BASE64.decode(&signature).unwrap().len(), 64);
        public.verify(&message(), &signature).unwrap();
        // Surrounding whitespace (e.g. from a header or file) is tolerated.
        public
            .verify(&message(), &format!(" {signature}\n"))
            .unwrap();
    }

    #[test]
    fn challenge_nonces_are_fresh_hex() {
        let a = challenge_nonce().unwrap();
        assert!(is_sha256_hex(&a), "{a}");
        assert_ne!(a, challenge_nonce().unwrap());
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap().public();
        let b = SecretKey::generate().unwrap().public();
        assert_ne!(a, b);
        assert_ne!(a.key_id(), b.key_id());
    }

    #[test]
    fn tampered_tenant_digest_name_or_version_fails() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let digest = sha256_hex(b"component");
        let signature = secret.sign(&plugin_message("acme", &digest, "resize", "1.0.0"));
        public
            .verify(
                &plugin_message("acme", &digest, "resize", "1.0.0"),
                &signature,
            )
            .unwrap();
        for tampered in [
            plugin_message("bolts", &digest, "resize", "1.0.0"),
            plugin_message("acme", &sha256_hex(b"other"), "resize", "1.0.0"),
            plugin_message("acme", &digest, "crop", "1.0.0"),
            plugin_message("acme", &digest, "resize", "1.0.1"),
            // Moving a field boundary must not keep the signature valid.
            plugin_message("acme", &digest, "resize\n1.0", ".0"),
            plugin_message_v1(&digest, "resize", "1.0.0"),
        ] {
            let err = public.verify(&tampered, &signature).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.message().contains("does not verify"), "{err}");
        }
    }

    #[test]
    fn a_signature_for_one_tenant_fails_for_another() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let component = b"\0asm component";
        let digest = sha256_hex(component);
        let signed = secret.sign_plugin(component, "tenant-a", "resize", "1.0.0");
        assert_eq!(signed.tenant, "tenant-a");
        public
            .verify_plugin_upload(&signed.signature, "tenant-a", &digest, "resize", "1.0.0")
            .unwrap();
        let err = public
            .verify_plugin_upload(&signed.signature, "tenant-b", &digest, "resize", "1.0.0")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("does not verify"), "{err}");
        // The error names only the caller's own tenant, never the one the signature was for.
        assert!(err.message().contains("tenant 'tenant-b'"), "{err}");
        assert!(!err.message().contains("tenant-a"), "{err}");
        // The same holds for the stored-version check and the signature-file check.
        assert!(
            public
                .verify_stored_plugin(
                    SignatureScheme::V2,
                    &signed.signature,
                    "tenant-b",
                    &digest,
                    "resize",
                    "1.0.0"
                )
                .is_err()
        );
        let err = public
            .verify_plugin(&signed, "tenant-b", &digest, "resize", "1.0.0")
            .unwrap_err();
        assert!(err.message().contains("for tenant"), "{err}");
        // Forging the file's tenant does not help: the signature itself names tenant-a.
        let forged = PluginSignature {
            tenant: "tenant-b".into(),
            ..signed.clone()
        };
        assert!(
            public
                .verify_plugin(&forged, "tenant-b", &digest, "resize", "1.0.0")
                .is_err()
        );
    }

    #[test]
    fn v1_signatures_are_refused_at_upload_with_a_clear_error() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let digest = sha256_hex(b"component");
        let v1 = secret.sign(&plugin_message_v1(&digest, "resize", "1.0.0"));
        let err = public
            .verify_plugin_upload(&v1, "acme", &digest, "resize", "1.0.0")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("weft-plugin-signature-v1"), "{err}");
        assert!(err.message().contains("sign the plugin again"), "{err}");
        assert!(err.message().contains("--tenant acme"), "{err}");
        // A version stored under v1 before tenant binding still verifies as what it is...
        public
            .verify_stored_plugin(SignatureScheme::V1, &v1, "acme", &digest, "resize", "1.0.0")
            .unwrap();
        // ...but not as a v2 one, and a v2 signature is not a v1 one.
        assert!(
            public
                .verify_stored_plugin(SignatureScheme::V2, &v1, "acme", &digest, "resize", "1.0.0")
                .is_err()
        );
        let v2 = secret.sign(&plugin_message("acme", &digest, "resize", "1.0.0"));
        assert!(
            public
                .verify_stored_plugin(SignatureScheme::V1, &v2, "acme", &digest, "resize", "1.0.0")
                .is_err()
        );
        // Records without a scheme are v1 (stored before the field existed).
        #[derive(Deserialize)]
        struct Record {
            #[serde(default)]
            scheme: SignatureScheme,
        }
        let old: Record = serde_json::from_str("{}").unwrap();
        assert_eq!(old.scheme, SignatureScheme::V1);
        assert_eq!(
            serde_json::to_string(&SignatureScheme::V2).unwrap(),
            "\"v2\""
        );
    }

    #[test]
    fn key_registration_proves_possession_for_one_tenant_and_challenge() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let proof = secret.sign_key_registration("acme", "nonce-1");
        public
            .verify_key_registration("acme", "nonce-1", &proof)
            .unwrap();
        for (tenant, challenge) in [("bolts", "nonce-1"), ("acme", "nonce-2")] {
            let err = public
                .verify_key_registration(tenant, challenge, &proof)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.message().contains("does not verify"), "{err}");
        }
        // Another key cannot prove possession of this one.
        let other = SecretKey::generate().unwrap();
        let err = public
            .verify_key_registration(
                "acme",
                "nonce-1",
                &other.sign_key_registration("acme", "nonce-1"),
            )
            .unwrap_err();
        assert!(err.message().contains(&public.key_id()), "{err}");
        // A registration proof is no plugin signature and the other way round.
        let digest = sha256_hex(b"c");
        assert!(
            public
                .verify_plugin_upload(&proof, "acme", &digest, "resize", "1")
                .is_err()
        );
        let signed = secret.sign(&plugin_message("acme", &digest, "resize", "1"));
        assert!(
            public
                .verify_key_registration("acme", "nonce-1", &signed)
                .is_err()
        );
        let err = public
            .verify_key_registration("acme", "nonce-1", "%%")
            .unwrap_err();
        assert!(err.message().contains("malformed signature"), "{err}");
    }

    #[test]
    fn tampered_signature_bytes_fail() {
        let secret = SecretKey::generate().unwrap();
        let mut bytes = BASE64.decode(secret.sign(&message())).unwrap();
        bytes[10] ^= 1;
        let err = secret
            .public()
            .verify(&message(), &BASE64.encode(&bytes))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn wrong_key_fails() {
        let signer = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap().public();
        let err = other
            .verify(&message(), &signer.sign(&message()))
            .unwrap_err();
        assert!(err.message().contains("does not verify"), "{err}");
        assert!(err.message().contains(&other.key_id()), "{err}");
    }

    #[test]
    fn malformed_signatures_are_errors() {
        let public = SecretKey::generate().unwrap().public();
        for bad in [
            "",
            "not base64!!",
            "AAAA",
            &BASE64.encode([0u8; 63]),
            &BASE64.encode([0u8; 65]),
        ] {
            let err = public.verify(&message(), bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
            assert!(err.message().contains("malformed signature"), "{err}");
        }
        // 64 bytes of garbage: well-formed length, does not verify (and does not panic).
        let err = public
            .verify(&message(), &BASE64.encode([0xffu8; 64]))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn malformed_public_keys_are_errors() {
        for bad in [
            "",
            "%%%",
            &BASE64.encode([1u8; 31]),
            &BASE64.encode([1u8; 33]),
            // The identity point is a valid encoding but of small order.
            &BASE64.encode({
                let mut b = [0u8; 32];
                b[0] = 1;
                b
            }),
        ] {
            let err = PublicKey::from_base64(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        }
        // Not on the curve (y = 2 has no x): an error, not a panic.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert!(PublicKey::from_base64(&BASE64.encode(not_a_point)).is_err());
    }

    #[test]
    fn public_key_base64_round_trip_and_id() {
        let public = SecretKey::generate().unwrap().public();
        let text = public.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(PublicKey::from_base64(&text).unwrap(), public);
        let id = public.key_id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, sha256_hex(&BASE64.decode(&text).unwrap())[..16]);
    }

    #[test]
    fn key_files_round_trip() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();

        let secret_text = secret.to_file_text();
        let value: serde_json::Value = serde_json::from_str(&secret_text).unwrap();
        assert_eq!(value["kind"], SECRET_KEY_KIND);
        assert_eq!(value["key_id"], public.key_id());
        let again = SecretKey::from_file_text(&secret_text).unwrap();
        assert_eq!(again.public(), public);
        public.verify(&message(), &again.sign(&message())).unwrap();

        let public_text = public.to_file_text();
        let value: serde_json::Value = serde_json::from_str(&public_text).unwrap();
        assert_eq!(value["kind"], PUBLIC_KEY_KIND);
        assert_eq!(value["public_key"], public.to_base64());
        assert_eq!(PublicKey::from_file_text(&public_text).unwrap(), public);
        // A bare base64 key is accepted too.
        assert_eq!(
            PublicKey::from_file_text(&format!("{}\n", public.to_base64())).unwrap(),
            public
        );
    }

    #[test]
    fn bad_key_files_are_errors() {
        let secret = SecretKey::generate().unwrap();
        let secret_text = secret.to_file_text();
        let seed = serde_json::from_str::<serde_json::Value>(&secret_text).unwrap()["secret_key"]
            .as_str()
            .unwrap()
            .to_owned();

        // Passing a secret key where a public key is expected: an error that does not echo it.
        let err = PublicKey::from_file_text(&secret_text).unwrap_err();
        assert!(err.message().contains("secret key file"), "{err}");
        assert!(!err.message().contains(&seed));
        // And the other way round.
        let err = SecretKey::from_file_text(&secret.public().to_file_text()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);

        for bad in [
            "",
            "{",
            "[]",
            "{\"kind\":\"weft-ed25519-secret-key\"}",
            "{\"kind\":\"weft-ed25519-secret-key\",\"secret_key\":\"***\"}",
            "{\"kind\":\"weft-ed25519-secret-key\",\"secret_key\":\"AAAA\"}",
        ] {
            let err = SecretKey::from_file_text(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        }
        // A key_id that does not match the key means the file is damaged.
        let wrong_id = secret_text.replace(&secret.public().key_id(), "0000000000000000");
        let err = SecretKey::from_file_text(&wrong_id).unwrap_err();
        assert!(err.message().contains("does not match"), "{err}");
        assert!(!err.message().contains(&seed));
        let public_wrong_id = secret
            .public()
            .to_file_text()
            .replace(&secret.public().key_id(), "0000000000000000");
        assert!(PublicKey::from_file_text(&public_wrong_id).is_err());
        assert!(PublicKey::from_file_text("{\"kind\":\"x\",\"public_key\":\"\"}").is_err());
        assert!(PublicKey::from_file_text("{not json").is_err());
    }

    #[test]
    fn debug_does_not_leak_the_secret() {
        let secret = SecretKey::generate().unwrap();
        let seed = BASE64.encode(secret.key.to_bytes());
        let debug = format!("{secret:?}");
        assert!(!debug.contains(&seed));
        assert!(debug.contains(&secret.public().key_id()));
        assert!(!debug.contains(&format!("{:?}", secret.key.to_bytes())));
    }

    #[test]
    fn plugin_signature_sign_verify_and_file_round_trip() {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        let component = b"\0asm fake component";
        let signature = secret.sign_plugin(component, "acme", "resize", "1.0.0");
        assert_eq!(signature.digest, sha256_hex(component));
        assert_eq!(signature.key_id, public.key_id());
        public
            .verify(
                &plugin_message("acme", &signature.digest, "resize", "1.0.0"),
                &signature.signature,
            )
            .unwrap();
        public
            .verify_plugin(
                &signature,
                "acme",
                &sha256_hex(component),
                "resize",
                "1.0.0",
            )
            .unwrap();
        assert!(
            public
                .verify_plugin(&signature, "acme", &sha256_hex(b"x"), "resize", "1.0.0")
                .is_err()
        );
        assert!(
            public
                .verify_plugin(&signature, "acme", &signature.digest, "resize", "2.0.0")
                .is_err()
        );
        let other = SecretKey::generate().unwrap().public();
        assert!(
            other
                .verify_plugin(&signature, "acme", &signature.digest, "resize", "1.0.0")
                .is_err()
        );

        let text = signature.to_file_text();
        assert_eq!(PluginSignature::from_file_text(&text).unwrap(), signature);
        assert!(PluginSignature::from_file_text("{}").is_err());
        assert!(PluginSignature::from_file_text("[").is_err());
        assert!(PluginSignature::from_file_text(&text.replacen('{', "{\"extra\": 1,", 1)).is_err());
        // A v1 file (no tenant) is refused with a message saying to sign again.
        let mut v1: serde_json::Value = serde_json::from_str(&text).unwrap();
        v1.as_object_mut().unwrap().remove("tenant");
        let err = PluginSignature::from_file_text(&v1.to_string()).unwrap_err();
        assert!(err.message().contains("names no tenant"), "{err}");
        assert!(err.message().contains("--tenant"), "{err}");
    }
}
