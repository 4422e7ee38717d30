//! The `weft` binary; all logic lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    weft_server::cli::main()
}
