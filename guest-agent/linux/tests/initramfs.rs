//! The Linux guest's initramfs (kernels/linux/build-initramfs.sh) as a guest would run it:
//! unpacked, `/init` (the agent) started as PID 1 in a fresh PID and mount namespace rooted
//! in it, then driven through the host client. Without VMX/SVM a Linux guest cannot reach
//! userspace on our machines; this runs the same userland on the host kernel instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use carrel_agent_client::{connect_unix_ready, ExecRequest};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

struct Guest {
    child: Child,
    root: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The agent mounted proc, sys and dev inside; they went away with its namespace.
        // The root's parent holds the archive too.
        let _ = std::fs::remove_dir_all(self.root.parent().unwrap_or(&self.root));
    }
}

fn boot_initramfs() -> Guest {
    let work = std::env::temp_dir().join(format!("carrel-initramfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let image = work.join("initramfs.cpio.gz");
    let built = Command::new("bash")
        .arg(repo_root().join("kernels/linux/build-initramfs.sh"))
        .arg(&image)
        .status()
        .expect("bash runs");
    assert!(built.success(), "kernels/linux/build-initramfs.sh failed");
    let root = work.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let unpacked = Command::new("sh")
        .arg("-c")
        .arg(format!("gunzip -c {} | cpio -idm --quiet", image.display()))
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(unpacked.success(), "the archive unpacks with cpio");
    let child = Command::new("unshare")
        // --kill-child: the namespace's PID 1 ends with unshare, so Drop leaves nothing behind.
        .args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "chroot"])
        .arg(&root)
        .args(["/init", "--unix", "/tmp/agent.sock"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare runs (util-linux)");
    Guest { child, root }
}

#[test]
fn initramfs_init_is_the_agent_as_pid_1_with_a_busybox_userland() {
    let guest = boot_initramfs();
    let mut client = connect_unix_ready(&guest.root.join("tmp/agent.sock"), Duration::from_secs(20)).unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let script = "echo hello from the initramfs; tr '\\0' ' ' < /proc/1/cmdline; echo; ls /bin | grep -c .";
    let status = client
        .exec(ExecRequest::shell(script), |stream, bytes| match stream {
            carrel_agent_client::OutputStream::Stdout => stdout.extend_from_slice(bytes),
            carrel_agent_client::OutputStream::Stderr => stderr.extend_from_slice(bytes),
        })
        .unwrap();
    let errors = String::from_utf8_lossy(&stderr).into_owned();
    assert!(status.success(), "{status:?}: {}{errors}", String::from_utf8_lossy(&stdout));
    let text = String::from_utf8(stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}{errors}");
    assert_eq!(lines[0], "hello from the initramfs");
    assert!(lines[1].starts_with("/init --unix"), "PID 1 is the agent: {:?}", lines[1]);
    assert!(lines[2].parse::<u32>().unwrap() >= 10, "busybox applets are there: {text}");
}
