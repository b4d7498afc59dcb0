//! What a snapshot keeps of the vsock device: the CID the guest had, for the record. Open
//! connections are not kept; a restored device resets the guest's transport instead.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}
