//! Running as PID 1 of a minimal initramfs: mount the filesystems a command expects.
//! (Reaping lives in [`crate::children`].)

use std::ffi::CString;
use std::io;

/// Errors preparing the system as init.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("creating mount point {target} failed")]
    CreateMountPoint {
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Whether this process is init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Mounts proc on /proc, sysfs on /sys and devtmpfs on /dev; already mounted is fine.
pub fn mount_early_filesystems() -> Result<(), Pid1Error> {
    let secure = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&'static str, &'static str, libc::c_ulong); 3] =
        [("proc", "/proc", secure), ("sysfs", "/sys", secure), ("devtmpfs", "/dev", libc::MS_NOSUID)];
    for (fstype, target, flags) in mounts {
        std::fs::create_dir_all(target).map_err(|source| Pid1Error::CreateMountPoint { target, source })?;
        let mount_error = |source| Pid1Error::Mount { fstype, target, source };
        let c_fstype = CString::new(fstype).map_err(|error| mount_error(io::Error::other(error)))?;
        let c_target = CString::new(target).map_err(|error| mount_error(io::Error::other(error)))?;
        // SAFETY: all strings are NUL-terminated and live across the call; data is null.
        let rc =
            unsafe { libc::mount(c_fstype.as_ptr(), c_target.as_ptr(), c_fstype.as_ptr(), flags, std::ptr::null()) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EBUSY) {
                return Err(mount_error(error));
            }
        }
    }
    Ok(())
}

/// Stops the machine: init must never exit, so a fatal error powers off instead.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory effects; as PID 1 we may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot failed (not permitted?): hang rather than let the kernel panic on init exit.
    loop {
        std::thread::park();
    }
}
