//! The 8250 serial console (COM1), its output captured to a bounded log file.
//!
//! The console output is guest-controlled, so the log is capped: a guest cannot
//! fill the host's disk. The last few KiB are also kept in memory, to explain a
//! failed boot in an error message, and a line announcing a kernel panic is
//! noted on the VM's [`ExitSignal`] (it only names the reset that follows).
//! The console is text any guest program may print: nothing on it stops the
//! VM (a guest stops through the i8042 reset line, `reboot=k`).

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::exit::ExitSignal;

/// How much console output is written to the log file at most.
pub const CONSOLE_LOG_LIMIT: u64 = 16 << 20;
/// How much console output is kept in memory.
const TAIL_LEN: usize = 16 << 10;
/// Longest line scanned for markers; longer lines are scanned by their start.
const LINE_MAX: usize = 512;

/// A console line the VMM notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// "Kernel panic - not syncing".
    Panic,
}

impl ConsoleEvent {
    fn parse(line: &[u8]) -> Option<ConsoleEvent> {
        let has = |needle: &[u8]| line.windows(needle.len()).any(|w| w == needle);
        has(b"Kernel panic - not syncing").then_some(ConsoleEvent::Panic)
    }
}

/// The console's sink: a capped log file, an in-memory tail and a line watcher.
#[derive(Debug)]
pub struct ConsoleLog {
    file: Option<File>,
    written: u64,
    tail: Arc<Mutex<Vec<u8>>>,
    line: Vec<u8>,
    exit: ExitSignal,
}

impl ConsoleLog {
    /// A sink writing to `file` (if any) and reporting to `exit`.
    pub fn new(file: Option<File>, exit: ExitSignal) -> Self {
        ConsoleLog {
            file,
            written: 0,
            tail: Arc::default(),
            line: Vec::new(),
            exit,
        }
    }

    /// A handle to the last bytes of output.
    pub fn tail(&self) -> Arc<Mutex<Vec<u8>>> {
        self.tail.clone()
    }

    fn end_line(&mut self) {
        match ConsoleEvent::parse(&self.line) {
            Some(ConsoleEvent::Panic) => self.exit.note_panic(),
            None => {}
        }
        self.line.clear();
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = self.file.as_mut() {
            let room = CONSOLE_LOG_LIMIT.saturating_sub(self.written) as usize;
            let n = buf.len().min(room);
            if n > 0 {
                // A failing log write must not stop the guest's console.
                if file.write_all(&buf[..n]).is_ok() {
                    self.written += n as u64;
                }
                if self.written == CONSOLE_LOG_LIMIT {
                    let _ =
                        file.write_all(b"\n[zygote: console log limit reached, output dropped]\n");
                }
            }
        }
        {
            let mut tail = self.tail.lock().expect("tail lock");
            tail.extend_from_slice(buf);
            if tail.len() > TAIL_LEN {
                let excess = tail.len() - TAIL_LEN;
                tail.drain(..excess);
            }
        }
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises an interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port I/O bus.
#[derive(Debug)]
pub struct SerialConsole {
    pub(super) serial: Serial<IrqTrigger, NoEvents, ConsoleLog>,
}

impl SerialConsole {
    /// A console raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleLog) -> Self {
        SerialConsole {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [first, rest @ ..]) = (u8::try_from(offset), data) {
            *first = self.serial.read(offset);
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            // Errors here are the irqfd's; the guest sees no difference.
            let _ = self.serial.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitReason;
    use std::time::Duration;

    #[test]
    fn a_panic_is_noted_and_no_line_stops_the_vm() {
        let exit = ExitSignal::default();
        let mut log = ConsoleLog::new(None, exit.clone());
        log.write_all(b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert_eq!(exit.reason(), None);
        exit.raise(ExitReason::Reset);
        assert_eq!(exit.wait_timeout(Duration::ZERO), Some(ExitReason::Panic));

        // A power-off line (which any guest program may print) stops
        // nothing: the VM stops on a device, not on its console's text.
        let exit = ExitSignal::default();
        let mut log = ConsoleLog::new(None, exit.clone());
        log.write_all(b"[ 2.0] reboot: Pow").unwrap();
        log.write_all(b"er down\nreboot: System halted\n").unwrap();
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn log_file_is_capped_and_tail_bounded() {
        let path = std::env::temp_dir().join(format!("zygote-console-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut log = ConsoleLog::new(Some(file), ExitSignal::default());
        let tail = log.tail();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(CONSOLE_LOG_LIMIT >> 20) + 3 {
            log.write_all(&chunk).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();
        assert!(
            (CONSOLE_LOG_LIMIT..CONSOLE_LOG_LIMIT + 128).contains(&len),
            "{len}"
        );
        assert_eq!(tail.lock().unwrap().len(), TAIL_LEN);
    }

    #[test]
    fn guest_writes_reach_the_log() {
        let out = ConsoleLog::new(None, ExitSignal::default());
        let tail = out.tail();
        let mut console = SerialConsole::new(EventFd::new(0).unwrap(), out);
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(&*tail.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }
}
