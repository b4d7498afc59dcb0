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
