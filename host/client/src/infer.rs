//! `weft infer MODEL`: one V2 JSON inference request, from a file or stdin, with the response
//! printed pretty on stdout.
//!
//! The request is checked to be JSON before sending (a typo then points at the input, not at the
//! server). A response with binary tensor data (the request asked for `binary_data` outputs) has
//! its JSON header printed and the size of the binary part reported on stderr.

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::cli::InferArgs;
use crate::http::{Payload, Server, parse_json, print_json};

/// Path segments of the infer endpoint for `model` (and `version`).
pub fn infer_segments<'a>(model: &'a str, version: Option<&'a str>) -> Vec<&'a str> {
    let mut segments = vec!["v2", "models", model];
    if let Some(version) = version {
        segments.extend(["versions", version]);
    }
    segments.push("infer");
    segments
}

fn read_input(input: &Path) -> Result<Vec<u8>> {
    if input == Path::new("-") {
        let mut stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("reading the V2 JSON request from stdin (end it with Ctrl-D)");
        }
        let mut bytes = Vec::new();
        stdin
            .read_to_end(&mut bytes)
            .context("cannot read the request from stdin")?;
        Ok(bytes)
    } else {
        std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))
    }
}

/// The JSON part of an infer response: all of it, or the first `Inference-Header-Content-Length`
/// bytes when binary tensor data follows. Returns it and the size of the binary part.
pub fn response_json(headers: &HeaderMap, body: &[u8]) -> Result<(Value, usize)> {
    let Some(length) = headers.get("inference-header-content-length") else {
        return Ok((parse_json(body)?, 0));
    };
    let length: usize = length
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .context("the server sent a malformed Inference-Header-Content-Length")?;
    if length > body.len() {
        bail!(
            "the server's Inference-Header-Content-Length ({length}) is longer than its answer ({} bytes)",
            body.len()
        );
    }
    Ok((parse_json(&body[..length])?, body.len() - length))
}

pub async fn run(args: InferArgs) -> Result<()> {
    let input = read_input(&args.input)?;
    let name = if args.input == Path::new("-") {
        "the request on stdin".to_string()
    } else {
        args.input.display().to_string()
    };
    let request: Value =
        serde_json::from_slice(&input).with_context(|| format!("{name} is not JSON"))?;
    if !request.is_object() {
        bail!("{name} must be a JSON object (a V2 inference request with \"inputs\")");
    }
    let server = Server::new(&args.connection.server, &args.connection.api_key)?;
    let segments = infer_segments(&args.model, args.version.as_deref());
    let (headers, body) = server
        .call_raw(Method::POST, &segments, Payload::Json(request))
        .await?;
    let (answer, binary) = response_json(&headers, &body)?;
    print_json(&answer)?;
    if binary > 0 {
        eprintln!("({binary} bytes of binary output data not shown)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn infer_paths() {
        assert_eq!(
            infer_segments("mlp", None),
            ["v2", "models", "mlp", "infer"]
        );
        assert_eq!(
            infer_segments("mlp", Some("3")),
            ["v2", "models", "mlp", "versions", "3", "infer"]
        );
    }

    #[test]
    fn binary_responses_print_their_json_header() {
        let mut headers = HeaderMap::new();
        let (json, binary) = response_json(&headers, br#"{"outputs": []}"#).unwrap();
        assert_eq!(json["outputs"], Value::Array(vec![]));
        assert_eq!(binary, 0);
        headers.insert("inference-header-content-length", "15".parse().unwrap());
        let (json, binary) = response_json(&headers, b"{\"outputs\": []}\x01\x02\x03\x04").unwrap();
        assert_eq!(json["outputs"], Value::Array(vec![]));
        assert_eq!(binary, 4);
        headers.insert("inference-header-content-length", "99".parse().unwrap());
        assert!(response_json(&headers, b"{}").is_err());
    }
}
