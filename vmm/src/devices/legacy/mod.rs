//! Legacy PC devices: the 8250 serial console and the i8042 reset line.

pub mod i8042;
pub mod persist;
pub mod serial;

pub use i8042::I8042;
pub use persist::{I8042State, SerialArgs, SerialSnapshot};
pub use serial::{ConsoleEvent, ConsoleLog, SerialConsole};
