//! The `weft` binary; all logic lives in the library.

fn main() -> std::process::ExitCode {
    weft_cli::main()
}
