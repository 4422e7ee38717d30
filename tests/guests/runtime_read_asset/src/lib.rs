//! Reads `/assets/<file>` (param `file`) and returns it as a BYTES tensor `content`; or, with
//! param `write`, tries to create a file there. Shows the filesystem is closed unless granted,
//! and read-only when granted.
struct ReadAsset;
impl weft_sdk::Transformer for ReadAsset {
    fn transform(
        _: Vec<weft_sdk::NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let file = weft_sdk::param(&params, "file").unwrap_or("vocab.txt");
        let path = format!("/assets/{file}");
        if weft_sdk::param(&params, "write").is_some() {
            return std::fs::write(&path, b"tampered")
                .map(|()| Vec::new())
                .map_err(|e| weft_sdk::Error::Other(format!("cannot write {path}: {e}")));
        }
        let content = std::fs::read(&path)
            .map_err(|e| weft_sdk::Error::Other(format!("cannot read {path}: {e}")))?;
        let tensor = weft_sdk::Tensor::from_bytes(&[1], &[content])?;
        Ok(vec![weft_sdk::NamedTensor {
            name: "content".into(),
            tensor,
        }])
    }
}
weft_sdk::export_transformer!(ReadAsset);
