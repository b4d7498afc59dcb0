//! Guest agent protocol. Not built yet: see the guest agent issue.
#![no_std]
