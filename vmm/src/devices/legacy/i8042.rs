//! The i8042 keyboard controller, reduced to what a guest uses to reset the
//! machine: command 0xfe (pulse the reset line) on port 0x64. With `reboot=k`
//! this is how the guest kernel restarts, and zygote treats it as the VM's end.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset line of an i8042.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    /// A controller that reports a reset to `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: input buffer empty, so the kernel's kb_wait() returns at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.raise(ExitReason::Reset);
        }
    }
}
