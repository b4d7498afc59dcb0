//! The VMM's seccomp filters (from `carrel-sandbox`, shared with the GPU backend) and the
//! io_uring rings they cannot see, restricted here to the operations they use: vectored
//! reads and writes for the block device, plain ones for the snapshot writer.

pub use carrel_sandbox::*;

/// An io_uring whose submissions may only be the operations `opcodes` (and, before it is
/// returned, an eventfd registration through `prepare`): io_uring operations do not pass
/// through seccomp, so the ring itself is restricted (`IORING_REGISTER_RESTRICTIONS` on a
/// ring created disabled, then enabled).
pub fn restricted_ring(
    entries: u32,
    opcodes: &[u8],
    prepare: impl FnOnce(&io_uring::IoUring) -> std::io::Result<()>,
) -> std::io::Result<io_uring::IoUring> {
    let ring = io_uring::IoUring::builder().setup_r_disabled().build(entries)?;
    prepare(&ring)?;
    use io_uring::register::Restriction;
    use io_uring::squeue::Flags;
    let mut restrictions: Vec<Restriction> = opcodes.iter().map(|opcode| Restriction::sqe_op(*opcode)).collect();
    // Ordering flags only (a flush drains and links its steps); no fixed files or buffers.
    restrictions.push(Restriction::sqe_flags_allowed((Flags::IO_DRAIN | Flags::IO_LINK).bits()));
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_ring_refuses_operations_outside_its_list() {
        use io_uring::{opcode, types};
        let mut ring = restricted_ring(4, &[opcode::Read::CODE], |_| Ok(())).unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let fd = types::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        let mut buffer = [0u8; 16];
        let read = opcode::Read::new(fd, buffer.as_mut_ptr(), 16).build().user_data(1);
        let write = opcode::Write::new(fd, buffer.as_ptr(), 16).build().user_data(2);
        // SAFETY: the buffer outlives the ring's use of it (the submissions are waited for).
        unsafe {
            ring.submission().push(&read).unwrap();
            ring.submission().push(&write).unwrap();
        }
        ring.submit_and_wait(2).unwrap();
        let mut results: Vec<(u64, i32)> = ring.completion().map(|entry| (entry.user_data(), entry.result())).collect();
        results.sort();
        assert_eq!(results[0], (1, 16));
        assert_eq!(results[1], (2, -libc::EACCES), "a write is not on the list");
    }
}
