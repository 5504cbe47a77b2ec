//! containerd-shim-zygote-v2: the containerd shim v2 entry point.
//!
//! Not implemented yet (see the shim issue): it says so clearly and fails, so
//! containerd reports a runtime error instead of hanging.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-v" || a == "--version") {
        println!(
            "containerd-shim-zygote-v2 {} (shim not implemented yet)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "containerd-shim-zygote-v2: the containerd shim is not implemented yet; use `zygote boot` to start a VM"
    );
    ExitCode::FAILURE
}
