//! The virtio-input configuration space (virtio 1.2, 5.8.4): the driver writes `select`
//! and `subsel`, then reads `size` and the union `u` to learn the device's name, ids and
//! which event codes it can send.
//!
//! The answers follow what Linux's `virtio_input` driver reads at probe: names without a
//! terminating NUL (it copies `size` bytes into a zeroed buffer), bitmaps trimmed after
//! their last non-zero byte, and any non-zero size for EV_REP (it only checks that one).

use std::fmt;

use crate::input::key::{KEY_ESC, KEY_MICMUTE};
use crate::input::{
    known_key_codes, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, BUS_VIRTUAL, EV_ABS, EV_KEY, EV_LED,
    EV_REL, EV_REP, LED_CAPSL, LED_NUML, LED_SCROLLL, REL_HWHEEL, REL_WHEEL,
};

/// `select` values.
pub const VIRTIO_INPUT_CFG_UNSET: u8 = 0x00;
pub const VIRTIO_INPUT_CFG_ID_NAME: u8 = 0x01;
pub const VIRTIO_INPUT_CFG_ID_SERIAL: u8 = 0x02;
pub const VIRTIO_INPUT_CFG_ID_DEVIDS: u8 = 0x03;
pub const VIRTIO_INPUT_CFG_PROP_BITS: u8 = 0x10;
pub const VIRTIO_INPUT_CFG_EV_BITS: u8 = 0x11;
pub const VIRTIO_INPUT_CFG_ABS_INFO: u8 = 0x12;

/// Offsets in `struct virtio_input_config`.
pub const SELECT_OFFSET: usize = 0;
pub const SUBSEL_OFFSET: usize = 1;
pub const SIZE_OFFSET: usize = 2;
pub const UNION_OFFSET: usize = 8;
/// Size of the union `u`.
pub const UNION_SIZE: usize = 128;
/// Size of `struct virtio_input_config`.
pub const CONFIG_SIZE: usize = UNION_OFFSET + UNION_SIZE;

/// "CR" as the PCI-style vendor id in the device ids.
pub const VENDOR_CARREL: u16 = 0x4352;

/// Which virtual input device this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// A US keyboard with LEDs and autorepeat.
    Keyboard,
    /// An absolute pointer (0..=32767 on both axes) with three buttons and two wheels.
    Tablet,
}

impl InputKind {
    /// The name the guest shows (`/proc/bus/input/devices`, `evtest`).
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Keyboard => "Carrel Keyboard",
            InputKind::Tablet => "Carrel Tablet",
        }
    }

    /// The lowercase word for messages and the serial.
    pub fn word(self) -> &'static str {
        match self {
            InputKind::Keyboard => "keyboard",
            InputKind::Tablet => "tablet",
        }
    }

    pub fn serial(self) -> String {
        format!("carrel-{}", self.word())
    }

    /// `struct virtio_input_devids` values: (bustype, vendor, product, version).
    pub fn device_ids(self) -> (u16, u16, u16, u16) {
        let product = match self {
            InputKind::Keyboard => 1,
            InputKind::Tablet => 2,
        };
        (BUS_VIRTUAL, VENDOR_CARREL, product, 1)
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl From<crate::input::Device> for InputKind {
    fn from(device: crate::input::Device) -> InputKind {
        match device {
            crate::input::Device::Keyboard => InputKind::Keyboard,
            crate::input::Device::Tablet => InputKind::Tablet,
        }
    }
}

/// The configuration space of one device: what the driver selected and the answer.
#[derive(Debug, Clone)]
pub struct InputConfig {
    kind: InputKind,
    bytes: [u8; CONFIG_SIZE],
}

impl InputConfig {
    pub fn new(kind: InputKind) -> InputConfig {
        InputConfig { kind, bytes: [0; CONFIG_SIZE] }
    }

    pub fn kind(&self) -> InputKind {
        self.kind
    }

    /// The whole structure as the driver reads it.
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Reads at `offset`; past the end reads as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.bytes, offset, data);
    }

    /// Writes at `offset`: only `select` and `subsel` are writable, and writing either
    /// recomputes `size` and `u`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut changed = false;
        for (index, byte) in data.iter().enumerate() {
            let Some(position) = offset.checked_add(index as u64) else { break };
            if position == SELECT_OFFSET as u64 || position == SUBSEL_OFFSET as u64 {
                self.bytes[position as usize] = *byte;
                changed = true;
            }
        }
        if changed {
            let payload = answer(self.kind, self.bytes[SELECT_OFFSET], self.bytes[SUBSEL_OFFSET]);
            self.bytes[SIZE_OFFSET..].fill(0);
            // `answer` never returns more than the union holds.
            let size = payload.len().min(UNION_SIZE);
            self.bytes[SIZE_OFFSET] = size as u8;
            self.bytes[UNION_OFFSET..UNION_OFFSET + size].copy_from_slice(&payload[..size]);
        }
    }

    /// Back to power-on: nothing selected.
    pub fn reset(&mut self) {
        self.bytes = [0; CONFIG_SIZE];
    }
}

/// The bytes of `u` for a selection; empty (size 0) for anything the device lacks.
pub fn answer(kind: InputKind, select: u8, subsel: u8) -> Vec<u8> {
    match (select, subsel) {
        (VIRTIO_INPUT_CFG_ID_NAME, 0) => kind.name().as_bytes().to_vec(),
        (VIRTIO_INPUT_CFG_ID_SERIAL, 0) => kind.serial().into_bytes(),
        (VIRTIO_INPUT_CFG_ID_DEVIDS, 0) => {
            let (bustype, vendor, product, version) = kind.device_ids();
            [bustype, vendor, product, version].iter().flat_map(|value| value.to_le_bytes()).collect()
        }
        (VIRTIO_INPUT_CFG_EV_BITS, event_type) => event_bits(kind, u16::from(event_type)),
        (VIRTIO_INPUT_CFG_ABS_INFO, axis) => abs_info(kind, u16::from(axis)),
        // No input properties (a tablet without INPUT_PROP_DIRECT is a mouse-like absolute
        // pointer to the guest, as QEMU's tablet is), and nothing for unknown selects.
        _ => Vec::new(),
    }
}

/// The codes of `event_type` the device sends, as a bitmap trimmed after its last
/// non-zero byte.
fn event_bits(kind: InputKind, event_type: u16) -> Vec<u8> {
    let codes: Vec<u16> = match (kind, event_type) {
        (InputKind::Keyboard, EV_KEY) => {
            // Every code from KEY_ESC to KEY_MICMUTE, as QEMU's keyboard does: a superset of
            // what the keymap produces (checked by the tests), so the guest's keymap is
            // never surprised by a key it was not told about.
            let mut codes: Vec<u16> = (KEY_ESC..=KEY_MICMUTE).collect();
            codes.extend(known_key_codes());
            codes
        }
        (InputKind::Keyboard, EV_LED) => vec![LED_NUML, LED_CAPSL, LED_SCROLLL],
        // Linux only checks that EV_REP has a size; the bitmap itself is not read.
        (InputKind::Keyboard, EV_REP) => return vec![0],
        (InputKind::Tablet, EV_KEY) => vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE],
        (InputKind::Tablet, EV_REL) => vec![REL_HWHEEL, REL_WHEEL],
        (InputKind::Tablet, EV_ABS) => vec![ABS_X, ABS_Y],
        _ => return Vec::new(),
    };
    bitmap(&codes)
}

fn bitmap(codes: &[u16]) -> Vec<u8> {
    let mut bits = [0u8; UNION_SIZE];
    for code in codes {
        if let Some(byte) = bits.get_mut(usize::from(*code / 8)) {
            *byte |= 1 << (code % 8);
        }
    }
    let used = bits.iter().rposition(|byte| *byte != 0).map_or(0, |last| last + 1);
    bits[..used].to_vec()
}

/// `struct virtio_input_absinfo { le32 min, max, fuzz, flat, res; }` for the tablet's axes.
fn abs_info(kind: InputKind, axis: u16) -> Vec<u8> {
    match (kind, axis) {
        (InputKind::Tablet, ABS_X | ABS_Y) => {
            [0u32, ABS_MAX as u32, 0, 0, 0].iter().flat_map(|value| value.to_le_bytes()).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{EV_MSC, EV_SYN};

    /// Selects like the driver (one byte at a time) and returns (size, u).
    fn select(config: &mut InputConfig, select: u8, subsel: u8) -> (u8, Vec<u8>) {
        config.write(SELECT_OFFSET as u64, &[select]);
        config.write(SUBSEL_OFFSET as u64, &[subsel]);
        let mut size = [0u8];
        config.read(SIZE_OFFSET as u64, &mut size);
        let mut union = vec![0u8; UNION_SIZE];
        config.read(UNION_OFFSET as u64, &mut union);
        (size[0], union)
    }

    /// The codes set in a bitmap of `size` bytes, checking nothing is set past it.
    fn bits_of(size: u8, union: &[u8]) -> Vec<u16> {
        assert!(union[size as usize..].iter().all(|byte| *byte == 0), "bits past size");
        (0..size as u16 * 8).filter(|bit| union[usize::from(bit / 8)] & (1 << (bit % 8)) != 0).collect()
    }

    #[test]
    fn name_is_exact_string_without_nul_for_each_kind() {
        for (kind, name) in [(InputKind::Keyboard, "Carrel Keyboard"), (InputKind::Tablet, "Carrel Tablet")] {
            let mut config = InputConfig::new(kind);
            let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_ID_NAME, 0);
            assert_eq!(size as usize, name.len());
            assert_eq!(&union[..name.len()], name.as_bytes());
            assert!(union[name.len()..].iter().all(|byte| *byte == 0));
        }
    }

    #[test]
    fn serial_is_carrel_dash_kind() {
        let mut config = InputConfig::new(InputKind::Tablet);
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_ID_SERIAL, 0);
        assert_eq!(&union[..size as usize], b"carrel-tablet");
        let mut config = InputConfig::new(InputKind::Keyboard);
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_ID_SERIAL, 0);
        assert_eq!(&union[..size as usize], b"carrel-keyboard");
    }

    #[test]
    fn devids_are_virtual_bus_carrel_vendor_and_product_per_kind() {
        for (kind, product) in [(InputKind::Keyboard, 1u16), (InputKind::Tablet, 2)] {
            let mut config = InputConfig::new(kind);
            let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_ID_DEVIDS, 0);
            assert_eq!(size, 8);
            let mut expected = Vec::new();
            for value in [0x06u16, 0x4352, product, 1] {
                expected.extend(value.to_le_bytes());
            }
            assert_eq!(&union[..8], &expected[..]);
        }
    }

    #[test]
    fn keyboard_ev_bits_are_exactly_keys_leds_and_repeat() {
        let mut config = InputConfig::new(InputKind::Keyboard);
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY as u8);
        let keys = bits_of(size, &union);
        assert_eq!(keys, (KEY_ESC..=KEY_MICMUTE).collect::<Vec<u16>>());
        assert_eq!(size as usize, usize::from(KEY_MICMUTE) / 8 + 1);
        for code in known_key_codes() {
            assert!(keys.contains(&code), "key {code} not advertised");
        }

        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_LED as u8);
        assert_eq!((size, bits_of(size, &union)), (1, vec![LED_NUML, LED_CAPSL, LED_SCROLLL]));
        let (size, _) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_REP as u8);
        assert_eq!(size, 1, "a non-zero size turns on the guest's autorepeat");
        for absent in [EV_SYN, EV_REL, EV_ABS, EV_MSC, 0x1f, 0xff] {
            assert_eq!(select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, absent as u8).0, 0, "type {absent}");
        }
    }

    #[test]
    fn tablet_ev_bits_are_exactly_buttons_wheels_and_axes() {
        let mut config = InputConfig::new(InputKind::Tablet);
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY as u8);
        assert_eq!(bits_of(size, &union), vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]);
        assert_eq!(size as usize, usize::from(BTN_MIDDLE) / 8 + 1);
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_REL as u8);
        assert_eq!((size, bits_of(size, &union)), (2, vec![REL_HWHEEL, REL_WHEEL]));
        let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, EV_ABS as u8);
        assert_eq!((size, bits_of(size, &union)), (1, vec![ABS_X, ABS_Y]));
        for absent in [EV_SYN, EV_LED, EV_REP, EV_MSC] {
            assert_eq!(select(&mut config, VIRTIO_INPUT_CFG_EV_BITS, absent as u8).0, 0, "type {absent}");
        }
    }

    #[test]
    fn tablet_abs_info_is_zero_to_32767_on_both_axes() {
        let mut config = InputConfig::new(InputKind::Tablet);
        for axis in [ABS_X, ABS_Y] {
            let (size, union) = select(&mut config, VIRTIO_INPUT_CFG_ABS_INFO, axis as u8);
            assert_eq!(size, 20);
            let field = |index: usize| u32::from_le_bytes(union[index * 4..index * 4 + 4].try_into().unwrap());
            assert_eq!([field(0), field(1), field(2), field(3), field(4)], [0, 32767, 0, 0, 0]);
        }
        assert_eq!(select(&mut config, VIRTIO_INPUT_CFG_ABS_INFO, 2).0, 0);
        let mut keyboard = InputConfig::new(InputKind::Keyboard);
        assert_eq!(select(&mut keyboard, VIRTIO_INPUT_CFG_ABS_INFO, ABS_X as u8).0, 0);
    }

    #[test]
    fn unset_prop_and_unknown_selects_have_size_zero_and_empty_union() {
        for kind in [InputKind::Keyboard, InputKind::Tablet] {
            let mut config = InputConfig::new(kind);
            // A previous answer must not leak into the next one.
            select(&mut config, VIRTIO_INPUT_CFG_ID_NAME, 0);
            for (chosen, subsel) in [
                (VIRTIO_INPUT_CFG_UNSET, 0),
                (VIRTIO_INPUT_CFG_PROP_BITS, 0),
                (VIRTIO_INPUT_CFG_ID_NAME, 1),
                (0x04, 0),
                (0x13, 0),
                (0xff, 0xff),
            ] {
                let (size, union) = select(&mut config, chosen, subsel);
                assert_eq!(size, 0, "select {chosen:#x}/{subsel}");
                assert!(union.iter().all(|byte| *byte == 0), "select {chosen:#x}/{subsel}");
            }
        }
    }

    #[test]
    fn select_and_subsel_written_together_and_read_back() {
        let mut config = InputConfig::new(InputKind::Tablet);
        config.write(0, &[VIRTIO_INPUT_CFG_EV_BITS, EV_ABS as u8, 0xaa, 0xbb]);
        let mut header = [0u8; 4];
        config.read(0, &mut header);
        assert_eq!(header, [VIRTIO_INPUT_CFG_EV_BITS, EV_ABS as u8, 1, 0], "size and reserved are read-only");
    }

    #[test]
    fn writes_outside_select_and_reads_past_end_are_harmless() {
        let mut config = InputConfig::new(InputKind::Keyboard);
        config.write(2, &[0xff; 200]);
        config.write(u64::MAX, &[1, 2, 3]);
        assert!(config.bytes().iter().all(|byte| *byte == 0));
        let mut data = [0xffu8; 8];
        config.read(CONFIG_SIZE as u64 - 4, &mut data);
        assert_eq!(data, [0; 8]);
        config.read(u64::MAX, &mut data);
        assert_eq!(data, [0; 8]);
    }

    #[test]
    fn reset_clears_the_selection() {
        let mut config = InputConfig::new(InputKind::Keyboard);
        select(&mut config, VIRTIO_INPUT_CFG_ID_NAME, 0);
        config.reset();
        assert!(config.bytes().iter().all(|byte| *byte == 0));
    }
}
