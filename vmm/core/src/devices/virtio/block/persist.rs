//! What a snapshot keeps of a disk: the frozen chain of layers the saved memory goes
//! with. The layers themselves stay where they are (no disk byte is copied); a restore
//! opens them read-only, checks each by id, and starts a new empty top over them.

use serde::{Deserialize, Serialize};

use crate::disk::DiskState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub disk: DiskState,
}
