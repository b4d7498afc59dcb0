//! Legacy devices: the 16550 serial console and the power/console ports.

pub mod power;
pub mod serial;

pub use power::{PowerDevice, VmExitSignal};
pub use serial::{ConsoleOutput, SerialDevice, SerialSaved};
