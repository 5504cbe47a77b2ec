//! containerd-shim-zygote-v2: the containerd shim v2 entry point
//! (`io.containerd.zygote.v2`). `delete` and serving are the containerd-shim
//! crate's bootstrap; `start` answers in containerd 1.6's form; `-v` prints
//! the version; `-info` prints containerd 2's `RuntimeInfo` protobuf;
//! `--zygote-pid-holder` is a task's host process (`task::holder`).

use zygote::containerd::shim::{ZygoteShim, serve, start_legacy};
use zygote::containerd::task::holder::{HOLDER_ARG, hold};

const RUNTIME: &str = "io.containerd.zygote.v2";

/// containerd's `containerd.types.RuntimeVersion`.
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeVersion {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(string, tag = "2")]
    revision: String,
}

/// containerd's `containerd.types.RuntimeInfo` (what `shim -info` prints;
/// zygote has no options or features to declare).
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    version: Option<RuntimeVersion>,
}

/// `-info`: the runtime's name and version as a protobuf on stdout.
fn print_info() {
    use std::io::Write;
    let info = RuntimeInfo {
        name: RUNTIME.into(),
        version: Some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            revision: String::new(),
        }),
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(&prost::Message::encode_to_vec(&info))
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(1);
    }
}

/// The serving shim's privileges and its VMM threads' seccomp mode
/// (`ZYGOTE_SECCOMP`); a mode it cannot read is an error.
fn restrict() {
    let mode = match zygote_vmm::jail::Mode::from_env() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{RUNTIME}: {e}");
            std::process::exit(1);
        }
    };
    zygote_vmm::jail::set_mode(mode);
    if let Err(e) = zygote::containerd::privileges::restrict() {
        eprintln!("{RUNTIME}: cannot give up privileges: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(HOLDER_ARG) {
        hold();
    }
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-zygote-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let flags = containerd_shim::parse(&args[1..]);
    if matches!(&flags, Ok(f) if f.action.is_empty() && !f.info) {
        // The serving shim (the one that runs VMs): before any thread exists.
        restrict();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("containerd-shim-zygote-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    match flags {
        Ok(flags) if flags.info => print_info(),
        Ok(flags) if flags.action == "start" => match runtime.block_on(start_legacy(&flags)) {
            Ok(address) => print!("{address}"),
            Err(e) => {
                eprintln!("{RUNTIME}: start: {e}");
                std::process::exit(1);
            }
        },
        Ok(flags) if flags.action.is_empty() => {
            if let Err(e) = runtime.block_on(serve(RUNTIME, &flags)) {
                eprintln!("{RUNTIME}: {e}");
                std::process::exit(1);
            }
        }
        _ => runtime.block_on(containerd_shim::asynchronous::run::<ZygoteShim>(
            RUNTIME, None,
        )),
    }
}
