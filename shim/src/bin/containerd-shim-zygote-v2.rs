//! containerd-shim-zygote-v2: the containerd shim v2 entry point
//! (`io.containerd.zygote.v2`). `delete` and serving are the containerd-shim
//! crate's bootstrap; `start` answers in containerd 1.6's form; `-v` prints
//! the version.

use zygote::containerd::shim::{ZygoteShim, serve, start_legacy};

const RUNTIME: &str = "io.containerd.zygote.v2";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-zygote-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
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
    match containerd_shim::parse(&args[1..]) {
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
