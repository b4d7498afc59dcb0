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
    /// The interrupt and console again, for rebuilding the UART from saved state.
    interrupt: EventFd,
    output: ConsoleOutput,
}

/// The UART's registers and receive FIFO as saved (vm-superio's `SerialState`, as serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSaved {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: ConsoleOutput) -> io::Result<SerialDevice> {
        let trigger = IrqTrigger(interrupt.try_clone()?);
        Ok(SerialDevice { uart: Serial::new(trigger, output.clone()), interrupt, output })
    }

    pub fn save(&self) -> SerialSaved {
        let s = self.uart.state();
        SerialSaved {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Loads saved UART state; vm-superio checks the FIFO fits.
    pub fn restore(&mut self, saved: &SerialSaved) -> Result<(), String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            saved.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let trigger = IrqTrigger(self.interrupt.try_clone().map_err(|err| err.to_string())?);
        self.uart = Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, self.output.clone())
            .map_err(|err| format!("saved serial port state is invalid: {err:?}"))?;
        Ok(())
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
        let mut serial = SerialDevice::new(interrupt, output).unwrap();
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(std::fs::read(&log_path).unwrap(), b"hi\n");
        std::fs::remove_file(&log_path).unwrap();
    }

    #[test]
    fn serial_state_round_trips_into_a_fresh_device() {
        let mut serial =
            SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), ConsoleOutput::new(false, None)).unwrap();
        serial.write(3, &[0x83]); // line control: DLAB on, 8 bits
        serial.write(7, &[0x5a]); // scratch
        serial.enqueue_input(b"ab");
        let saved = serial.save();
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let mut fresh =
            SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), ConsoleOutput::new(false, None)).unwrap();
        fresh.restore(&postcard::from_bytes(&bytes).unwrap()).unwrap();
        assert_eq!(fresh.save(), saved);
    }

    #[test]
    fn serial_restore_refuses_an_overfull_fifo() {
        let mut serial =
            SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), ConsoleOutput::new(false, None)).unwrap();
        let mut saved = serial.save();
        saved.in_buffer = vec![0; 1 << 16];
        assert!(serial.restore(&saved).is_err());
    }

    #[test]
    fn serial_input_is_readable_from_rbr() {
        let output = ConsoleOutput::new(false, None);
        let mut serial = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), output).unwrap();
        assert_eq!(serial.enqueue_input(b"x"), 1);
        let mut data = [0u8];
        serial.read(0, &mut data);
        assert_eq!(data[0], b'x');
    }
}
