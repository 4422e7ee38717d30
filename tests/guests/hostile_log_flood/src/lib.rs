//! Hostile: logs in a loop until its deadline, through the host log and stdout, with lines that
//! try to forge host log entries (newlines, carriage returns, ANSI escapes).
struct LogFlood;
impl weft_sdk::Transformer for LogFlood {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let lines = weft_sdk::param_usize(&params, "lines")?.unwrap_or(usize::MAX);
        let forged = "flood\n2026-01-01T00:00:00Z  INFO weft: FORGED admin login\r\u{1b}[2J";
        for line in 0..lines {
            weft_sdk::log(weft_sdk::Level::Info, &format!("{line} {forged}"));
            if line < 640 && line % 64 == 0 {
                println!("stdout {line} {forged}");
            }
        }
        Ok(inputs)
    }
}
weft_sdk::export_transformer!(LogFlood);
