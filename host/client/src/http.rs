//! Talking to the server: URL building, bearer auth, and turning responses into either JSON or
//! the one error line a person should see.
//!
//! Every command goes through [`Server::call`], so all of them report failures the same way:
//! a non-2xx answer becomes `server said <status>: <the server's error text>`, a network failure
//! names the method and URL that failed.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::cli::TenantConnection;

/// Characters left as they are in a path segment (RFC 3986 "unreserved"); all else is %XX.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encodes one path segment. Empty, `.` and `..` segments are refused: URL parsers
/// collapse them (even as `%2e%2e`), which would send the request somewhere else.
pub fn encode_segment(segment: &str) -> Result<String> {
    if segment.is_empty() {
        bail!("a name or version in the URL is empty");
    }
    if segment == "." || segment == ".." {
        bail!("'{segment}' is not a valid name or version");
    }
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if is_unreserved(byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(encoded)
}

/// Checks a `--server` value: an http:// or https:// URL, returned without trailing slashes.
pub fn base_url(server: &str) -> Result<String> {
    let trimmed = server.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed).with_context(|| {
        format!(
            "--server '{server}' is not a URL (expected e.g. {})",
            crate::cli::DEFAULT_SERVER
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        bail!("--server '{server}' must be an http:// or https:// URL with a host");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        bail!("--server '{server}' must not have a query or fragment");
    }
    Ok(trimmed.to_string())
}

/// `base` + `/` + each segment, percent-encoded. `base` comes from [`base_url`]; fixed segments
/// (`api`, `v1`, ...) go through the same encoding, which leaves them unchanged.
pub fn build_url(base: &str, segments: &[&str]) -> Result<String> {
    let mut url = base.trim_end_matches('/').to_string();
    for segment in segments {
        url.push('/');
        url.push_str(&encode_segment(segment)?);
    }
    Ok(url)
}

/// The text to show for a non-2xx answer: the server's `{"error": "..."}` when it sent one,
/// else its body text, else the status's reason.
pub fn error_text(status: StatusCode, body: &[u8]) -> String {
    if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body)
        && let Some(Value::String(error)) = object.get("error")
    {
        return error.clone();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if !text.is_empty() {
        // A proxy's HTML page can be long; the first part says enough.
        return text.chars().take(500).collect();
    }
    status
        .canonical_reason()
        .unwrap_or("no details")
        .to_string()
}

/// What a request carries.
pub enum Payload {
    Empty,
    Json(Value),
    /// Raw bytes with their content type and extra headers; `progress` prints upload progress.
    Bytes {
        body: Bytes,
        content_type: &'static str,
        headers: Vec<(&'static str, String)>,
        progress: bool,
    },
}

/// A server plus the bearer key to use with it.
pub struct Server {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Server {
    pub fn new(server: &str, key: &str) -> Result<Server> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Server {
            http,
            base: base_url(server)?,
            key: key.trim().to_string(),
        })
    }

    pub fn url(&self, segments: &[&str]) -> Result<String> {
        build_url(&self.base, segments)
    }

    /// Sends one request; returns the response headers and body of a 2xx answer.
    pub async fn call_raw(
        &self,
        method: Method,
        segments: &[&str],
        payload: Payload,
    ) -> Result<(HeaderMap, Bytes)> {
        self.call_raw_query(method, segments, &[], payload).await
    }

    /// [`Server::call_raw`] with query parameters (encoded by reqwest).
    pub async fn call_raw_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        payload: Payload,
    ) -> Result<(HeaderMap, Bytes)> {
        let url = self.url(segments)?;
        let mut request = self
            .http
            .request(method.clone(), &url)
            .query(query)
            .bearer_auth(&self.key);
        request = match payload {
            Payload::Empty => request,
            Payload::Json(value) => request.json(&value),
            Payload::Bytes {
                body,
                content_type,
                headers,
                progress,
            } => {
                let length = body.len();
                let mut request = request
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    // Sent up front even for a streamed body, so the server can refuse an
                    // oversized upload before reading it.
                    .header(reqwest::header::CONTENT_LENGTH, length.to_string())
                    .body(crate::progress::upload_body(body, progress));
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request
            }
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url} failed"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("{method} {url}: reading the response failed"))?;
        if !status.is_success() {
            let error = error_text(status, &body);
            bail!("server said {status}: {error}");
        }
        Ok((headers, body))
    }

    /// Streams the body of a 2xx answer to `GET segments` into `out`, block by block (a
    /// file far larger than memory is fine); returns the bytes written.
    pub async fn download(&self, segments: &[&str], out: &mut dyn std::io::Write) -> Result<u64> {
        use futures_util::StreamExt as _;
        let url = self.url(segments)?;
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("GET {url} failed"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            bail!("server said {status}: {}", error_text(status, &body));
        }
        let mut blocks = response.bytes_stream();
        let mut written = 0u64;
        while let Some(block) = blocks.next().await {
            let block = block.with_context(|| format!("GET {url}: reading the answer failed"))?;
            out.write_all(&block).context("cannot write the file")?;
            written += block.len() as u64;
        }
        out.flush().context("cannot write the file")?;
        Ok(written)
    }

    /// [`Server::call_raw`] for JSON answers (an empty body reads as `null`).
    pub async fn call(&self, method: Method, segments: &[&str], payload: Payload) -> Result<Value> {
        let (_, body) = self.call_raw(method, segments, payload).await?;
        parse_json(&body)
    }
}

pub fn parse_json(body: &[u8]) -> Result<Value> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).with_context(|| {
        format!(
            "the server's answer is not JSON: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })
}

/// Prints a JSON value, pretty, on stdout; a closed stdout (e.g. `| head`) is an error, not a panic.
pub fn print_json(value: &Value) -> Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value).context("cannot format the answer")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").context("cannot write to stdout")?;
    Ok(())
}

impl Server {
    /// Sends `method` to `segments` without a body and prints the JSON answer.
    pub async fn call_and_print(&self, method: Method, segments: &[&str]) -> Result<()> {
        print_json(&self.call(method, segments, Payload::Empty).await?)
    }
}

/// Lists `/api/v1/<collection>` as the tenant and prints the answer.
pub async fn list_as_tenant(connection: &TenantConnection, collection: &str) -> Result<()> {
    Server::new(&connection.server, &connection.api_key)?
        .call_and_print(Method::GET, &["api", "v1", collection])
        .await
}

/// Deletes `/api/v1/<collection>/<name>`, or only one version of it
/// (`.../versions/<version>`), as the tenant and prints the answer.
pub async fn delete_as_tenant(
    connection: &TenantConnection,
    collection: &str,
    name: &str,
    version: Option<&str>,
) -> Result<()> {
    let mut segments = vec!["api", "v1", collection, name];
    if let Some(version) = version {
        segments.extend(["versions", version]);
    }
    Server::new(&connection.server, &connection.api_key)?
        .call_and_print(Method::DELETE, &segments)
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn urls_have_single_slashes() {
        let base = base_url("http://127.0.0.1:8000/").unwrap();
        assert_eq!(base, "http://127.0.0.1:8000");
        assert_eq!(
            build_url(&base, &["api", "v1", "plugins", "p", "versions", "1.0"]).unwrap(),
            "http://127.0.0.1:8000/api/v1/plugins/p/versions/1.0"
        );
        let base = base_url("https://weft.example/prefix//").unwrap();
        assert_eq!(
            build_url(&base, &["v2", "models", "mlp", "infer"]).unwrap(),
            "https://weft.example/prefix/v2/models/mlp/infer"
        );
        assert!(!build_url(&base, &["a"]).unwrap().contains("//prefix"));
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(
            encode_segment("a b/c?d#e%").unwrap(),
            "a%20b%2Fc%3Fd%23e%25"
        );
        assert_eq!(encode_segment("ok-name_1.2~x").unwrap(), "ok-name_1.2~x");
        assert_eq!(encode_segment("é").unwrap(), "%C3%A9");
        assert!(encode_segment("..").is_err());
        assert!(encode_segment(".").is_err());
        assert!(encode_segment("").is_err());
        // The encoded URL parses back to the same path: nothing was re-interpreted.
        let url = build_url("http://h", &["graphs", "x/../y"]).unwrap();
        assert_eq!(
            reqwest::Url::parse(&url).unwrap().path(),
            "/graphs/x%2F..%2Fy"
        );
    }

    #[test]
    fn bad_server_urls_are_refused() {
        assert!(base_url("localhost:8000").is_err());
        assert!(base_url("127.0.0.1:8000").is_err());
        assert!(base_url("ftp://h").is_err());
        assert!(base_url("http://h/?x=1").is_err());
        assert_eq!(base_url(" http://h:1 ").unwrap(), "http://h:1");
    }

    #[test]
    fn error_text_prefers_the_servers_error_field() {
        let status = StatusCode::CONFLICT;
        assert_eq!(
            error_text(status, br#"{"error": "plugin p version 1 already exists"}"#),
            "plugin p version 1 already exists"
        );
        assert_eq!(error_text(status, b"  plain text\n"), "plain text");
        assert_eq!(error_text(status, b""), "Conflict");
        assert_eq!(
            error_text(status, br#"{"message": "x"}"#),
            r#"{"message": "x"}"#
        );
    }
}
