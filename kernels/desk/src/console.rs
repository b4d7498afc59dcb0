//! Console output in whole lines: one port write hands the VMM a line (one exit) instead
//! of one exit per byte on the UART.

use carrel_firmware::{ports, ConsoleRecord, CONSOLE_RECORD_MAX};
use core::arch::asm;
use core::fmt::{self, Write};

use crate::GuestCell;

static RECORD: GuestCell<ConsoleRecord> = GuestCell::new(ConsoleRecord { len: 0, bytes: [0; CONSOLE_RECORD_MAX] });

/// Writes text into the pending record; a full record or a newline sends it.
pub struct Console;

impl Console {
    fn push(&mut self, byte: u8) {
        let record = RECORD.get();
        record.bytes[record.len as usize] = byte;
        record.len += 1;
        if byte == b'\n' || record.len as usize == CONSOLE_RECORD_MAX {
            flush();
        }
    }
}

/// Hands the pending record to the VMM.
pub fn flush() {
    let record = RECORD.get();
    if record.len == 0 {
        return;
    }
    let address = record as *const ConsoleRecord as usize as u32;
    // SAFETY: a port write to the VMM's console port; the record lives in identity-mapped
    // RAM below 4 GiB, as the port's contract requires.
    unsafe { asm!("out dx, eax", in("dx") ports::CONSOLE, in("eax") address, options(nostack, preserves_flags)) };
    record.len = 0;
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            self.push(byte);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Bytes shown as lowercase hex, two digits each, for log lines and command output.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}
