//! `tokenize`: a transformer from BYTES text to INT64 token ids — non-float types end to end.
//!
//! Input: the first BYTES tensor, shape [N] (one text per row). Output `ids` (or param `output`),
//! INT64 [N, max_len]: lower-cased whitespace-separated words looked up in `vocab`
//! (comma-separated; word i gets id i + 2), 1 for unknown words, 0 for padding. `max_len`
//! defaults to 16.

use weft_sdk::{Datatype, Error, NamedTensor, Params, Tensor, Transformer, param, param_usize};

struct Tokenize;

/// Token ids of one text, padded or cut to `max_len`.
pub fn token_ids(text: &str, vocab: &[&str], max_len: usize) -> Vec<i64> {
    let mut ids: Vec<i64> = text
        .split_whitespace()
        .map(|word| word.to_lowercase())
        .map(|word| {
            vocab
                .iter()
                .position(|v| *v == word)
                .map_or(1, |i| i as i64 + 2)
        })
        .take(max_len)
        .collect();
    ids.resize(max_len, 0);
    ids
}

impl Transformer for Tokenize {
    fn transform(inputs: Vec<NamedTensor>, params: Params) -> Result<Vec<NamedTensor>, Error> {
        let vocab: Vec<&str> = param(&params, "vocab")
            .map(|v| v.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let max_len = param_usize(&params, "max_len")?.unwrap_or(16).max(1);
        let input = inputs
            .iter()
            .find(|i| i.tensor.datatype() == Datatype::Bytes)
            .ok_or_else(|| Error::InvalidInput("tokenize: needs a BYTES input".into()))?;
        let mut ids = Vec::new();
        let texts = input.tensor.to_bytes()?;
        for text in &texts {
            let text = std::str::from_utf8(text)
                .map_err(|_| Error::InvalidInput("tokenize: text is not UTF-8".into()))?;
            ids.extend(token_ids(text, &vocab, max_len));
        }
        let name = param(&params, "output").unwrap_or("ids").to_string();
        let tensor = Tensor::from_i64(&[texts.len() as u32, max_len as u32], &ids)?;
        Ok(vec![NamedTensor { name, tensor }])
    }
}

weft_sdk::export_transformer!(Tokenize);
