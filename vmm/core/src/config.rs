//! VM configuration: a `vm.toml` file and/or command-line flags with the same names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::BootProtocol;

/// Default guest RAM.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("no kernel given: pass --kernel PATH or set `kernel` in the config file")]
    MissingKernel,
    #[error("kernel {path} does not exist")]
    KernelNotFound { path: String },
    #[error("initrd {path} does not exist")]
    InitrdNotFound { path: String },
    #[error("display {text:?} is not WIDTHxHEIGHT (e.g. 1280x800) or \"none\"")]
    BadDisplay { text: String },
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {got}")]
    BadCpus { got: u64 },
}

/// Everything needed to build a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` picks a default for the guest kind.
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "default_mem", alias = "mem")]
    pub mem_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u64,
    /// Also write console output to this file.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Write console output to stdout (default true).
    #[serde(default = "default_true")]
    pub console_stdout: bool,
    /// Serve this VM's control socket at this path.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub boot: BootProtocol,
    /// Attach the virtio-rng device (default true).
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Attach virtio-vsock, its host side at this Unix socket path.
    #[serde(default)]
    pub vsock: Option<PathBuf>,
    /// The screen: "WIDTHxHEIGHT" (default 1280x800, up to 3840x2160) or "none".
    #[serde(default = "default_display")]
    pub display: String,
    /// Record every control request in the audit log in this directory.
    #[serde(default)]
    pub audit: Option<PathBuf>,
    /// The VM's name: the audit log is tied to it.
    #[serde(default = "default_name")]
    pub name: String,
    /// The guest's vsock CID.
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    /// Run the screen in a vhost-user backend process (`carrel-gpu-backend`) listening on
    /// this socket instead of in this process; the display size is the backend's.
    #[serde(default)]
    pub gpu_backend: Option<PathBuf>,
    /// The backend's screen socket (its `--screen-socket`): screenshots and input waits.
    #[serde(default)]
    pub gpu_screen: Option<PathBuf>,
    /// Disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...): `[[disk]]`
    /// tables in `vm.toml`, `--disk PATH[,readonly][,base=RAW][,size=N]` on the command line.
    #[serde(default, rename = "disk")]
    pub disks: Vec<crate::disk::DiskSpec>,
}

fn default_display() -> String {
    "1280x800".to_string()
}

fn default_name() -> String {
    "vm".to_string()
}

fn default_cid() -> u64 {
    3
}

fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

fn default_cpus() -> u64 {
    1
}

fn default_true() -> bool {
    true
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: None,
            initrd: None,
            cmdline: None,
            mem_mib: DEFAULT_MEM_MIB,
            cpus: 1,
            console_log: None,
            console_stdout: true,
            socket: None,
            boot: BootProtocol::Auto,
            rng: true,
            vsock: None,
            display: default_display(),
            audit: None,
            name: default_name(),
            guest_cid: 3,
            gpu_backend: None,
            gpu_screen: None,
            disks: Vec::new(),
        }
    }
}

impl VmConfig {
    /// The screen size, or `None` for a VM without a screen.
    pub fn display_size(&self) -> Result<Option<(u32, u32)>, ConfigError> {
        if self.display == "none" {
            return Ok(None);
        }
        let bad = || ConfigError::BadDisplay { text: self.display.clone() };
        let (width, height) = self.display.split_once('x').ok_or_else(bad)?;
        Ok(Some((width.parse().map_err(|_| bad())?, height.parse().map_err(|_| bad())?)))
    }

    /// Reads a `vm.toml`.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
        VmConfig::from_toml(&text).map_err(|message| ConfigError::Parse { path: name, message })
    }

    pub fn from_toml(text: &str) -> Result<VmConfig, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim().replace('\n', " "))
    }

    /// Checks what can be checked before touching KVM: files exist, counts in range.
    pub fn validate(&self) -> Result<&Path, ConfigError> {
        let kernel = self.kernel.as_deref().ok_or(ConfigError::MissingKernel)?;
        if !kernel.is_file() {
            return Err(ConfigError::KernelNotFound { path: kernel.display().to_string() });
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdNotFound { path: initrd.display().to_string() });
            }
        }
        self.validate_machine()?;
        Ok(kernel)
    }

    /// The checks that also hold for a restore, which loads no kernel: sizes and counts.
    pub fn validate_machine(&self) -> Result<(), ConfigError> {
        self.display_size()?;
        if self.cpus == 0 || self.cpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::BadCpus { got: self.cpus });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_all_fields_parses() {
        let config = VmConfig::from_toml(
            r#"
            kernel = "desk.elf"
            cmdline = "desk.exit=1"
            mem = 256
            cpus = 2
            console_log = "console.log"
            socket = "/tmp/vm.sock"
            boot = "desk"
            "#,
        )
        .unwrap();
        assert_eq!(config.kernel.as_deref(), Some(Path::new("desk.elf")));
        assert_eq!(config.mem_mib, 256);
        assert_eq!(config.cpus, 2);
        assert_eq!(config.boot, BootProtocol::Desk);
        assert!(config.rng && config.console_stdout);
    }

    #[test]
    fn toml_disk_tables_parse_in_order() {
        let config = VmConfig::from_toml(
            r#"
            kernel = "desk.elf"
            [[disk]]
            path = "agent.layer"
            base = "debian.raw"
            [[disk]]
            path = "scratch.img"
            readonly = true
            "#,
        )
        .unwrap();
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0].base.as_deref(), Some(Path::new("debian.raw")));
        assert!(config.disks[1].readonly && !config.disks[0].readonly);
    }

    #[test]
    fn toml_with_unknown_field_is_rejected() {
        let err = VmConfig::from_toml("kernel = \"x\"\nmemory_mb = 5").unwrap_err();
        assert!(err.contains("memory_mb"), "{err}");
    }

    #[test]
    fn validate_reports_missing_kernel_and_bad_cpus() {
        assert!(matches!(VmConfig::default().validate(), Err(ConfigError::MissingKernel)));
        let missing = VmConfig { kernel: Some("/nonexistent/kernel".into()), ..VmConfig::default() };
        assert!(matches!(missing.validate(), Err(ConfigError::KernelNotFound { .. })));
        let exe = std::env::current_exe().unwrap();
        let bad_cpus = VmConfig { kernel: Some(exe), cpus: 0, ..VmConfig::default() };
        assert!(matches!(bad_cpus.validate(), Err(ConfigError::BadCpus { got: 0 })));
    }
}
