//! An input device's saved state: which kind it is and what the driver last selected in
//! configuration space. Events not yet delivered are not kept: a restored VM starts with
//! an empty event queue, as after a reconnect of a real device.

use serde::{Deserialize, Serialize};

use super::config::{InputConfig, InputKind, SELECT_OFFSET, SUBSEL_OFFSET};
use crate::devices::virtio::persist::VirtioPersistError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputState {
    /// `InputKind::word()`: "keyboard" or "tablet".
    pub kind: String,
    pub select: u8,
    pub subsel: u8,
}

impl InputState {
    pub fn of(kind: InputKind, config: &InputConfig) -> InputState {
        let bytes = config.bytes();
        InputState { kind: kind.word().to_string(), select: bytes[SELECT_OFFSET], subsel: bytes[SUBSEL_OFFSET] }
    }

    /// Selects again what the driver had selected, which recomputes the answer.
    pub fn load_into(&self, config: &mut InputConfig) -> Result<(), VirtioPersistError> {
        if self.kind != config.kind().word() {
            return Err(VirtioPersistError::BadState {
                device: "input",
                reason: format!("saved as a {}, this VM's device is a {}", self.kind, config.kind().word()),
            });
        }
        config.write(SELECT_OFFSET as u64, &[self.select, self.subsel]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{CONFIG_SIZE, SIZE_OFFSET, VIRTIO_INPUT_CFG_ABS_INFO, VIRTIO_INPUT_CFG_EV_BITS};
    use super::super::device::InputDevice;
    use super::*;
    use crate::devices::virtio::persist::VirtioDeviceState;
    use crate::devices::virtio::vsock::VsockState;
    use crate::devices::virtio::VirtioDevice;
    use crate::input::{ABS_Y, EV_KEY};

    fn config_space(device: &InputDevice) -> Vec<u8> {
        let mut bytes = vec![0u8; CONFIG_SIZE];
        device.read_config(0, &mut bytes);
        bytes
    }

    #[test]
    fn input_state_round_trips_the_driver_selection_into_a_fresh_device() {
        let cases = [
            (InputKind::Keyboard, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY as u8),
            (InputKind::Tablet, VIRTIO_INPUT_CFG_ABS_INFO, ABS_Y as u8),
        ];
        for (kind, select, subsel) in cases {
            let (mut original, _sink) = InputDevice::new(kind).unwrap();
            original.write_config(SELECT_OFFSET as u64, &[select]);
            original.write_config(SUBSEL_OFFSET as u64, &[subsel]);
            let answer = config_space(&original);
            assert_ne!(answer[SIZE_OFFSET], 0, "{kind}: the selection has an answer to lose");

            let saved = original.save().unwrap();
            let expected = InputState { kind: kind.word().to_string(), select, subsel };
            assert_eq!(saved, VirtioDeviceState::Input(expected), "{kind}");
            let loaded: VirtioDeviceState = postcard::from_bytes(&postcard::to_allocvec(&saved).unwrap()).unwrap();
            let (mut fresh, _sink) = InputDevice::new(kind).unwrap();
            fresh.restore(&loaded).unwrap();
            assert_eq!(fresh.save().unwrap(), saved, "{kind}: save, restore, save again: the same state");
            assert_eq!(config_space(&fresh), answer, "{kind}: the restored device answers the saved selection");
        }
    }

    #[test]
    fn input_restore_of_another_device_or_input_kind_is_refused_and_changes_nothing() {
        let (mut keyboard, _sink) = InputDevice::new(InputKind::Keyboard).unwrap();
        let unselected = config_space(&keyboard);
        for other in [VirtioDeviceState::Rng, VirtioDeviceState::Vsock(VsockState { guest_cid: 3 })] {
            let kind = other.kind();
            assert!(
                matches!(
                    keyboard.restore(&other),
                    Err(VirtioPersistError::WrongDevice { ref saved, built: "input" }) if saved == kind
                ),
                "{kind} state into an input device"
            );
        }
        let tablet = InputState { kind: "tablet".into(), select: VIRTIO_INPUT_CFG_EV_BITS, subsel: EV_KEY as u8 };
        assert!(matches!(
            keyboard.restore(&VirtioDeviceState::Input(tablet)),
            Err(VirtioPersistError::BadState { device: "input", .. })
        ));
        assert_eq!(config_space(&keyboard), unselected, "a refused state selects nothing");
    }
}
