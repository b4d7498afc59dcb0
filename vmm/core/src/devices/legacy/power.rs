//! Power off and the batched console: the i8042 reset command, Carrel's power port and
//! console port, and the ACPI sleep and reset registers the FADT names (see
//! `carrel_firmware::ports`). None of them holds state a snapshot must keep.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use carrel_firmware::{ports, CONSOLE_RECORD_MAX};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::legacy::ConsoleOutput;

/// How the guest asked the VM to end: an exit code, signalled on an eventfd.
#[derive(Debug)]
pub struct VmExitSignal {
    pub eventfd: EventFd,
    code: AtomicI32,
}

impl VmExitSignal {
    pub fn new() -> std::io::Result<VmExitSignal> {
        Ok(VmExitSignal { eventfd: EventFd::new(libc::EFD_NONBLOCK)?, code: AtomicI32::new(0) })
    }

    /// Records `code` and wakes the event loop.
    pub fn request(&self, code: i32) {
        self.code.store(code, Ordering::SeqCst);
        let _ = self.eventfd.write(1);
    }

    pub fn code(&self) -> i32 {
        self.code.load(Ordering::SeqCst)
    }
}

/// The ports a guest uses to end the VM or to print a whole line in one exit.
/// Registered on the I/O bus at [`ports::I8042_COMMAND`], [`ports::POWER`],
/// [`ports::CONSOLE`] and the ACPI registers; `offset` is relative to each registration,
/// so the device is registered once per port with a `PowerPort` tag each.
#[derive(Debug)]
pub struct PowerDevice {
    port: PowerPort,
    exit: Arc<VmExitSignal>,
    memory: GuestMemoryMmap,
    console: ConsoleOutput,
}

/// Which port a [`PowerDevice`] instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerPort {
    I8042,
    Power,
    Console,
    /// The FADT's SLEEP_CONTROL_REG: SLP_EN with SLP_TYP S5 is `poweroff`.
    AcpiSleepControl,
    /// The FADT's SLEEP_STATUS_REG: never reports a wake (the VM never sleeps).
    AcpiSleepStatus,
    /// The FADT's RESET_REG.
    AcpiReset,
}

/// SLP_TYP in the sleep control register.
const ACPI_SLEEP_TYPE_MASK: u8 = 0b111 << 2;

impl PowerDevice {
    pub fn new(
        port: PowerPort,
        exit: Arc<VmExitSignal>,
        memory: GuestMemoryMmap,
        console: ConsoleOutput,
    ) -> PowerDevice {
        PowerDevice { port, exit, memory, console }
    }

    /// Copies a console record from guest memory to the console. A bad address or
    /// length is the guest's bug: it is reported on the console, not trusted.
    fn write_console_record(&self, gpa: u64) {
        let len = match self.memory.read_obj::<u32>(GuestAddress(gpa)) {
            Ok(len) => len as usize,
            Err(_) => return self.console.write_bytes(b"[carrel: console record outside guest RAM]\n"),
        };
        if len > CONSOLE_RECORD_MAX {
            return self.console.write_bytes(b"[carrel: console record too long]\n");
        }
        let mut bytes = vec![0u8; len];
        match self.memory.read_slice(&mut bytes, GuestAddress(gpa + 4)) {
            Ok(()) => self.console.write_bytes(&bytes),
            Err(_) => self.console.write_bytes(b"[carrel: console record outside guest RAM]\n"),
        }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // i8042 status: output buffer empty, input buffer empty. The power, console and
        // ACPI ports read as zero (no wake status).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        match self.port {
            PowerPort::I8042 if data[0] == ports::I8042_RESET => self.exit.request(0),
            PowerPort::I8042 => {}
            PowerPort::Power => self.exit.request(i32::from(data[0])),
            PowerPort::Console if data.len() == 4 => {
                let gpa = u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                self.write_console_record(gpa);
            }
            PowerPort::Console => {}
            PowerPort::AcpiSleepControl => {
                let sleep_type = (data[0] & ACPI_SLEEP_TYPE_MASK) >> 2;
                if data[0] & ports::ACPI_SLEEP_ENABLE != 0 && sleep_type == ports::ACPI_SLEEP_TYPE_S5 {
                    self.exit.request(0);
                }
            }
            PowerPort::AcpiSleepStatus => {}
            PowerPort::AcpiReset if data[0] == ports::ACPI_RESET_VALUE => self.exit.request(0),
            PowerPort::AcpiReset => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(port: PowerPort, log: Option<std::fs::File>) -> (PowerDevice, Arc<VmExitSignal>) {
        let exit = Arc::new(VmExitSignal::new().unwrap());
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let console = ConsoleOutput::new(false, log);
        (PowerDevice::new(port, exit.clone(), memory, console), exit)
    }

    #[test]
    fn i8042_reset_requests_exit_zero() {
        let (mut device, exit) = device(PowerPort::I8042, None);
        device.write(0, &[0x20]);
        assert!(exit.eventfd.read().is_err(), "a non-reset command must not end the VM");
        device.write(0, &[ports::I8042_RESET]);
        assert_eq!(exit.eventfd.read().unwrap(), 1);
        assert_eq!(exit.code(), 0);
    }

    #[test]
    fn acpi_sleep_enable_with_s5_requests_exit_zero_and_other_writes_do_not() {
        let (mut device, exit) = device(PowerPort::AcpiSleepControl, None);
        let s5 = ports::ACPI_SLEEP_TYPE_S5 << 2;
        device.write(0, &[s5]);
        assert!(exit.eventfd.read().is_err(), "SLP_TYP without SLP_EN is not a sleep");
        device.write(0, &[(3 << 2) | ports::ACPI_SLEEP_ENABLE]);
        assert!(exit.eventfd.read().is_err(), "S3 is not power-off");
        exit.request(7);
        let _ = exit.eventfd.read();
        device.write(0, &[s5 | ports::ACPI_SLEEP_ENABLE]);
        assert_eq!(exit.eventfd.read().unwrap(), 1);
        assert_eq!(exit.code(), 0);
    }

    #[test]
    fn acpi_reset_value_requests_exit_zero() {
        let (mut device, exit) = device(PowerPort::AcpiReset, None);
        device.write(0, &[ports::ACPI_RESET_VALUE.wrapping_add(1)]);
        assert!(exit.eventfd.read().is_err());
        device.write(0, &[ports::ACPI_RESET_VALUE]);
        assert_eq!(exit.eventfd.read().unwrap(), 1);
        assert_eq!(exit.code(), 0);
    }

    #[test]
    fn acpi_sleep_status_reads_zero_and_ignores_writes() {
        let (mut device, exit) = device(PowerPort::AcpiSleepStatus, None);
        device.write(0, &[0x80]);
        let mut status = [0xffu8];
        device.read(0, &mut status);
        assert_eq!(status, [0]);
        assert!(exit.eventfd.read().is_err());
    }

    #[test]
    fn power_port_byte_becomes_exit_code() {
        let (mut device, exit) = device(PowerPort::Power, None);
        device.write(0, &[3]);
        assert_eq!(exit.code(), 3);
    }

    #[test]
    fn console_record_is_copied_and_bad_records_are_reported() {
        let path = std::env::temp_dir().join(format!("carrel-power-test-{}", std::process::id()));
        let (mut device, _) = device(PowerPort::Console, Some(std::fs::File::create(&path).unwrap()));
        device.memory.write_obj(5u32, GuestAddress(0x100)).unwrap();
        device.memory.write_slice(b"hello", GuestAddress(0x104)).unwrap();
        device.write(0, &0x100u32.to_le_bytes());
        device.memory.write_obj(u32::MAX, GuestAddress(0x200)).unwrap();
        device.write(0, &0x200u32.to_le_bytes());
        device.write(0, &0xffff_0000u32.to_le_bytes());
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "hello[carrel: console record too long]\n[carrel: console record outside guest RAM]\n");
    }
}
