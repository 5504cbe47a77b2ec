//! zygote-agent binary: see the library's documentation.

use zygote_agent::{init, selftest, server, sys, vsock};

use std::process::ExitCode;

fn main() -> ExitCode {
    // As PID 1 the arguments are whatever the kernel did not recognize on its
    // command line: ignore them.
    if std::process::id() == 1 {
        init::setup();
        zygote_agent::procs::start_reaper();
        return serve();
    }
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("stress-echo") => selftest::child_echo(false),
        Some("stress-threads") => selftest::child_echo(true),
        Some("serve") => serve(),
        Some("pod-namespaces") => {
            zygote_agent::container::podns::main(args.get(2).map(String::as_str))
        }
        Some("vsock-flood") => zygote_agent::flood::main(args.get(2).map_or("", String::as_str)),
        Some("container-exec") => match args.get(2) {
            Some(config) => zygote_agent::container::init::exec_main(config),
            None => ExitCode::from(2),
        },
        Some("container-init") => match (args.get(2).map(String::as_str), args.get(3)) {
            (Some("--staged"), Some(config)) => zygote_agent::container::staged::main(config),
            (Some(config), None) => zygote_agent::container::init::main(config),
            _ => ExitCode::from(2),
        },
        Some("--version") => {
            println!("zygote-agent {}", zygote_agent_api::VERSION);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: zygote-agent [serve | stress-echo | stress-threads | vsock-flood SECONDS | --version]"
            );
            eprintln!("(with no argument it must run as PID 1 inside a zygote VM)");
            ExitCode::from(2)
        }
    }
}

fn serve() -> ExitCode {
    let started = sys::boottime_ns();
    server::allow_debug(server::debug_in_cmdline(
        &std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    ));
    match vsock::VsockListener::bind(zygote_agent_api::AGENT_PORT) {
        Ok(listener) => {
            eprintln!(
                "zygote-agent {}: listening on vsock port {}",
                zygote_agent_api::VERSION,
                zygote_agent_api::AGENT_PORT
            );
            serve_stdio();
            if let Err(e) = vsock::notify_host(zygote_agent_api::READY_PORT) {
                eprintln!("zygote-agent: no host listening for the ready signal: {e}");
            }
            server::serve(listener, started);
        }
        Err(e) => eprintln!("zygote-agent: cannot listen on vsock: {e}"),
    }
    if std::process::id() == 1 {
        // PID 1 must not exit: that panics the kernel. Power off instead.
        init::power_off();
    }
    ExitCode::FAILURE
}

/// Accepts stdio streams on [`zygote_agent_api::STDIO_PORT`] and attaches each
/// to its container's process.
fn serve_stdio() {
    let listener = match vsock::VsockListener::bind(zygote_agent_api::STDIO_PORT) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("zygote-agent: cannot listen for stdio streams: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("agent-stdio-accept".into())
        .spawn(move || {
            loop {
                let Ok(mut stream) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                use zygote_agent::container::registry::{Registry, read_stdio_header};
                match read_stdio_header(&mut stream) {
                    Ok((id, which)) => {
                        if let Err(e) = Registry::global().attach(&id, &which, stream) {
                            eprintln!("zygote-agent: stdio {id} {which}: {e}");
                        }
                    }
                    Err(e) => eprintln!("zygote-agent: stdio stream: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("zygote-agent: cannot start the stdio thread: {e}");
    }
}
