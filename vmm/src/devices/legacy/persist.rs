//! Saved state of the console (8250 registers and FIFO) and the i8042 reset line.

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use super::i8042::I8042;
use super::serial::{ConsoleLog, IrqTrigger, SerialConsole};
use crate::exit::ExitSignal;
use crate::persist::Persist;

/// The 8250's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// What a restored console needs: its interrupt and a fresh log.
#[derive(Debug)]
pub struct SerialArgs {
    /// The interrupt line.
    pub irq: EventFd,
    /// Where the new VM's output goes.
    pub out: ConsoleLog,
}

/// Errors restoring the console.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// The saved FIFO holds more than an 8250 can.
    #[error("saved serial FIFO holds {0} bytes, more than the device's")]
    FifoTooLong(usize),
}

impl Persist for SerialConsole {
    type State = SerialSnapshot;
    type ConstructorArgs = SerialArgs;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(args: SerialArgs, state: &SerialSnapshot) -> Result<Self, SerialRestoreError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::<IrqTrigger, NoEvents, ConsoleLog>::from_state(
            &s,
            IrqTrigger(args.irq),
            NoEvents,
            args.out,
        )
        .map_err(|_| SerialRestoreError::FifoTooLong(state.in_buffer.len()))?;
        Ok(SerialConsole { serial })
    }
}

/// The i8042 holds no state: a reset pulse ends the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = ExitSignal;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(exit: ExitSignal, _state: &I8042State) -> Result<Self, Self::Error> {
        Ok(I8042::new(exit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    fn console() -> (SerialConsole, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let out = ConsoleLog::new(None, ExitSignal::default());
        let tail = out.tail();
        (SerialConsole::new(EventFd::new(0).unwrap(), out), tail)
    }

    #[test]
    fn serial_round_trip_keeps_registers_and_writes_to_the_new_log() {
        let (mut serial, _) = console();
        serial.write(3, &[0x80]); // DLAB on
        serial.write(0, &[0x0c]); // divisor 9600 baud
        serial.write(3, &[0x03]); // 8N1, DLAB off
        serial.write(1, &[0x01]); // IER: data available
        serial.write(7, &[0x5a]); // scratch
        let state = serial.save();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: SerialSnapshot = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        let out = ConsoleLog::new(None, ExitSignal::default());
        let tail = out.tail();
        let mut restored = SerialConsole::restore(
            SerialArgs {
                irq: EventFd::new(0).unwrap(),
                out,
            },
            &back,
        )
        .unwrap();
        assert_eq!(restored.save(), state);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        restored.write(0, b"x");
        assert_eq!(
            &*tail.lock().unwrap(),
            b"x",
            "output goes to the fork's own log"
        );

        let mut bad = state.clone();
        bad.in_buffer = vec![0; 4096];
        assert!(matches!(
            SerialConsole::restore(
                SerialArgs {
                    irq: EventFd::new(0).unwrap(),
                    out: ConsoleLog::new(None, ExitSignal::default())
                },
                &bad
            ),
            Err(SerialRestoreError::FifoTooLong(4096))
        ));
    }

    #[test]
    fn i8042_round_trip() {
        let dev = I8042::new(ExitSignal::default());
        let state = dev.save();
        let bytes = postcard::to_stdvec(&state).unwrap();
        let back: I8042State = postcard::from_bytes(&bytes).unwrap();
        let exit = ExitSignal::default();
        let mut restored = I8042::restore(exit.clone(), &back).unwrap();
        assert_eq!(restored.save(), state);
        restored.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(crate::exit::ExitReason::Reset));
    }
}
