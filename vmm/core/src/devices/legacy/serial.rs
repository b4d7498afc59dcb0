//! The serial console: a 16550 UART (vm-superio) on COM1 with its interrupt, writing to
//! the VMM's stdout and/or a console log file.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{lock, BusDevice};

/// Where console text goes: stdout, a log file, both or neither. Shared by the UART and
/// the batched console port, so both land in one stream in order.
#[derive(Debug, Clone)]
pub struct ConsoleOutput {
    inner: Arc<Mutex<ConsoleSinks>>,
}

#[derive(Debug)]
struct ConsoleSinks {
    stdout: bool,
    log: Option<File>,
}

impl ConsoleOutput {
    pub fn new(stdout: bool, log: Option<File>) -> ConsoleOutput {
        ConsoleOutput { inner: Arc::new(Mutex::new(ConsoleSinks { stdout, log })) }
    }

    /// Writes `bytes` to every sink. Console output is best effort: a closed stdout or a
    /// full disk must not stop the guest.
    pub fn write_bytes(&self, bytes: &[u8]) {
        let mut sinks = lock(&self.inner);
        if sinks.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        if let Some(log) = sinks.log.as_mut() {
            let _ = log.write_all(bytes);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises the UART's interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the I/O bus.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: ConsoleOutput) -> SerialDevice {
        SerialDevice { uart: Serial::new(IrqTrigger(interrupt), output) }
    }

    /// Queues bytes typed on the host for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or_default()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failed interrupt write or console write is not the guest's fault; the
            // UART state stays consistent either way.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_write_to_thr_reaches_console_log() {
        let log_path = std::env::temp_dir().join(format!("carrel-serial-test-{}", std::process::id()));
        let log = File::create(&log_path).unwrap();
        let output = ConsoleOutput::new(false, Some(log));
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(interrupt, output);
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(std::fs::read(&log_path).unwrap(), b"hi\n");
        std::fs::remove_file(&log_path).unwrap();
    }

    #[test]
    fn serial_input_is_readable_from_rbr() {
        let output = ConsoleOutput::new(false, None);
        let mut serial = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), output);
        assert_eq!(serial.enqueue_input(b"x"), 1);
        let mut data = [0u8];
        serial.read(0, &mut data);
        assert_eq!(data[0], b'x');
    }
}
