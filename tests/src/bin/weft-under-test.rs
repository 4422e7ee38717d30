//! The `weft` entry point, built inside the e2e package so its tests can spawn it by path
//! (`CARGO_BIN_EXE_weft-under-test`): the same code as the shipped binary, nothing added.

fn main() -> std::process::ExitCode {
    weft_cli::main()
}
