//! Resource limits per VM with cgroups. Each VM gets a group of its own under the
//! daemon's group, `<daemon's group>/<--cgroup NAME>/<vm>`, made fresh before each start
//! of its VMM; the VMM enters it between fork and exec (so it never runs outside it),
//! with limits on memory, CPU and tasks from the VM's config. The group's files give the
//! usage Vms.Get reports and the OOM killer's count for the exit reason. The group goes
//! with the VM.
//!
//! Which cgroup version the host runs is decided here, once, at the daemon's start
//! ([`Cgroups::open`]), from `/proc/self/mountinfo` and `/proc/self/cgroup`:
//!
//! - **v2** (production hosts): a cgroup2 mount whose root offers the `memory`
//!   controller. One directory per group: `memory.max`, `memory.swap.max`, `cpu.max`,
//!   `pids.max`; usage from `memory.current`, `memory.peak`, `cpu.stat`, `pids.current`,
//!   the OOM kills from `memory.events`. A group holding processes cannot hand
//!   controllers to children, so when the daemon's own group refuses, the daemon moves
//!   itself into a leaf `carreld` beside the VMs' parent.
//! - **v1** (also hybrid hosts whose cgroup2 mount lacks `memory`, like the development
//!   machines): one hierarchy per controller (`memory`, `cpu`, `cpuacct`, `pids`, some
//!   co-mounted); the VM's group is made in each, under the daemon's group in that
//!   hierarchy. `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`,
//!   `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`; usage from
//!   `memory.usage_in_bytes`, `memory.max_usage_in_bytes`, `cpuacct.usage`,
//!   `pids.current`, the OOM kills from `memory.oom_control`.
//!
//! Neither usable (no permission, no controllers): the daemon says so at start and the
//! VMs run without limits.
//!
//! No crate: cgroups-rs covers every controller of both versions through a large API
//! built around its own hierarchy types; Carrel needs a dozen files, and the one thing
//! such crates do not help with, entering the group between fork and exec with nothing
//! but write(2), is done here on descriptors opened before the fork.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The memory a VMM uses beyond its guest's RAM, added to `memory_mib` for the default
/// limit. Measured: a 256 MiB Desk VM (debug build) whose guest filled 236 MiB of its
/// heap, then served 10 screenshots and clicks at once, peaked at 8.4 MB above its guest
/// RAM in its v1 memory cgroup (`memory.max_usage_in_bytes` minus the `shmem` of
/// `memory.stat`: 4.5 MB of heap and stacks, 3.4 MB of kernel memory). The group is also
/// charged for the pages of the carrel-vmm binary when this VMM is the first to read
/// them (6 MB resident) and for screenshot buffers, which grow with the display;
/// 32 MiB leaves room for both.
pub const VMM_OVERHEAD_MIB: u64 = 32;

/// The smallest memory limit a VM may ask for: a Desk VM's VMM with its screen uses
/// 11 MB right after boot; below this, a VM cannot do anything useful.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 64;

/// Tasks a VMM may have beyond its vCPU threads. Counted in /proc/PID/task of a running
/// Desk VMM: 4 with one vCPU (the main event loop, the control socket's accept thread,
/// vcpu0, and KVM's kvm-nx-lpage-recovery worker, which the pids controller counts too),
/// idle or serving; 6 at most with two io_uring disks under the guest's diskbench and
/// during a snapshot. Each control connection in flight adds one thread, and io_uring
/// may add kernel workers; 64 is room for those and still stops a runaway.
pub const TASK_MARGIN: u64 = 64;

/// The CPU period the quota is given in, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors setting up or removing a group.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create the cgroup {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot rename the cgroup {from} to {to}: {source}")]
    Rename { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: std::io::Error },
    #[error("cannot open {path} to place the VMM in its cgroup: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot remove the cgroup {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
}

/// The cgroup version the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Where the VMs' groups are made: the VMs' parent group, whose directories the VMs'
/// own groups are made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    parent: Group,
}

impl std::ops::Deref for Cgroups {
    type Target = Group;

    fn deref(&self) -> &Group {
        &self.parent
    }
}

/// What a VM's group limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// Microseconds of CPU per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
    pub tasks: u64,
    pub disk: DiskLimits,
}

/// Reads and writes per second on the block devices under a VM's disk files (0: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskLimits {
    /// (major, minor) of whole disks.
    pub devices: Vec<(u32, u32)>,
    pub bytes_per_second: u64,
    pub iops: u64,
}

/// The whole block devices the files at `paths` (or, for one not made yet, its
/// directory) live on. A file on a filesystem without a block device (tmpfs, overlay)
/// has none, and cannot be limited.
pub fn block_devices<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut devices: Vec<(u32, u32)> = paths
        .filter_map(|path| std::fs::metadata(path).ok().or_else(|| std::fs::metadata(path.parent()?).ok()))
        .filter_map(|metadata| {
            let device = metadata.dev();
            let (major, minor) = (libc::major(device), libc::minor(device));
            let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
            // A partition's limit goes on its disk, whose "dev" is one level up.
            let disk = if sys.join("partition").exists() { sys.join("../dev") } else { sys.join("dev") };
            let text = std::fs::read_to_string(disk).ok()?;
            let (major, minor) = text.trim().split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

impl Limits {
    /// The limits of a VM with `cpus` vCPUs and `memory_mib` of RAM, or an explicit
    /// memory limit. The CPU quota is the vCPUs' whole share plus half a CPU for the
    /// device threads, so a busy guest does not starve its own screen and disks.
    pub fn for_vm(memory_mib: u64, cpus: u32, memory_limit_mib: Option<u64>) -> Limits {
        let memory_mib = memory_limit_mib.unwrap_or(memory_mib + VMM_OVERHEAD_MIB);
        Limits {
            memory_bytes: memory_mib << 20,
            cpu_quota_us: u64::from(cpus) * CPU_PERIOD_US + CPU_PERIOD_US / 2,
            tasks: u64::from(cpus) + TASK_MARGIN,
            disk: DiskLimits::default(),
        }
    }
}

/// A VM's use of the host as its group's files say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub cpu_usage_us: u64,
    pub cpu_quota_us: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
}

/// A group: its directory in each controller's hierarchy (one directory for all on v2;
/// on v1 co-mounted controllers share one). The VMs' parent, or one VM's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    version: Version,
    memory: PathBuf,
    cpu: PathBuf,
    /// v1 only, and only when the cpuacct controller is mounted.
    cpuacct: Option<PathBuf>,
    pids: PathBuf,
    /// Disk I/O limits: the blkio hierarchy on v1, the io controller on v2; none when the
    /// host offers neither.
    io: Option<PathBuf>,
}

impl Cgroups {
    fn of(parent: Group) -> Cgroups {
        Cgroups { parent }
    }

    /// Finds the cgroup version in use and makes the VMs' parent group `name` under the
    /// daemon's own group; `Err` says why the VMs will run without limits.
    pub fn open(name: &str) -> Result<Cgroups, String> {
        let read = |path: &str| std::fs::read_to_string(path).map_err(|err| format!("cannot read {path}: {err}"));
        let controllers = |root: &Path| std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let cgroups = Cgroups::locate(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?, name, controllers)?;
        cgroups.make_parents()?;
        Ok(cgroups)
    }

    /// Where the parents go, from the mount table, this process's groups and the
    /// controllers a cgroup2 root offers: the one place the version is decided.
    fn locate(
        mountinfo: &str,
        self_cgroup: &str,
        name: &str,
        v2_controllers: impl Fn(&Path) -> String,
    ) -> Result<Cgroups, String> {
        // (mount point, mount root, filesystem type, super options) of each cgroup mount.
        let mounts: Vec<(PathBuf, String, String, String)> = mountinfo
            .lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let left: Vec<&str> = left.split(' ').collect();
                let right: Vec<&str> = right.split(' ').collect();
                let (root, point, fstype, options) = (*left.get(3)?, *left.get(4)?, *right.first()?, *right.get(2)?);
                fstype.starts_with("cgroup").then(|| (PathBuf::from(point), root.into(), fstype.into(), options.into()))
            })
            .collect();
        // The group's directory under a mount: this process's path in that hierarchy,
        // less the mount's own root (a mount of a sub-tree, as in containers).
        let under = |point: &Path, root: &str, path: &str| {
            let relative = path.strip_prefix(root.trim_end_matches('/')).unwrap_or(path);
            point.join(relative.trim_start_matches('/')).join(name)
        };
        let v2 = mounts.iter().find(|(_, _, fstype, _)| fstype == "cgroup2");
        let v2_path = self_cgroup.lines().find_map(|line| line.strip_prefix("0::"));
        if let (Some((point, root, _, _)), Some(path)) = (v2, v2_path) {
            let offered = v2_controllers(point);
            if offered.split_whitespace().any(|controller| controller == "memory") {
                let dir = under(point, root, path);
                let io = offered.split_whitespace().any(|controller| controller == "io").then(|| dir.clone());
                return Ok(Cgroups::of(Group {
                    version: Version::V2,
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    cpuacct: None,
                    pids: dir,
                    io,
                }));
            }
        }
        let v1 = |controller: &str| -> Option<PathBuf> {
            let (point, root, _, _) = mounts.iter().find(|(_, _, fstype, options)| {
                fstype == "cgroup" && options.split(',').any(|option| option == controller)
            })?;
            let path = self_cgroup.lines().find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                controllers.split(',').any(|c| c == controller).then_some(path)
            })?;
            Some(under(point, root, path))
        };
        match (v1("memory"), v1("cpu"), v1("pids")) {
            (Some(memory), Some(cpu), Some(pids)) => Ok(Cgroups::of(Group {
                version: Version::V1,
                memory,
                cpu,
                cpuacct: v1("cpuacct"),
                pids,
                io: v1("blkio"),
            })),
            _ => {
                Err("no cgroup v2 with the memory controller, and no cgroup v1 memory, cpu and pids hierarchies".into())
            }
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Where the VMs' groups go, for the start message.
    pub fn describe(&self) -> String {
        match self.version {
            Version::V2 => format!("cgroup v2 at {}", self.memory.display()),
            Version::V1 => format!(
                "cgroup v1: memory {}, cpu {}, pids {}",
                self.memory.display(),
                self.cpu.display(),
                self.pids.display()
            ),
        }
    }

    /// Makes the parent groups; on v2 also hands the controllers down to them.
    fn make_parents(&self) -> Result<(), String> {
        for dir in self.dirs() {
            std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        }
        if self.version == Version::V2 {
            let parent = &self.memory;
            let daemon_group = parent.parent().ok_or("the cgroup parent has no parent")?;
            if enable_controllers(daemon_group, self.io.is_some()).is_err() {
                // The daemon's group holds the daemon: move it into a leaf first.
                let leaf = daemon_group.join("carreld");
                std::fs::create_dir_all(&leaf).map_err(|err| format!("cannot create {}: {err}", leaf.display()))?;
                write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                    .map_err(|err| err.to_string())?;
                enable_controllers(daemon_group, self.io.is_some()).map_err(|err| err.to_string())?;
            }
            enable_controllers(parent, self.io.is_some()).map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    /// The group of VM `vm` (made or not).
    pub fn vm(&self, vm: &str) -> Group {
        let join = |dir: &PathBuf| dir.join(vm);
        Group {
            version: self.version,
            memory: join(&self.memory),
            cpu: join(&self.cpu),
            cpuacct: self.cpuacct.as_ref().map(join),
            pids: join(&self.pids),
            io: self.io.as_ref().map(join),
        }
    }

    /// A fresh group for `vm` with `limits`: a group left from an earlier run is removed
    /// first (with anything still in it), so its counters start at zero.
    pub fn prepare(&self, vm: &str, limits: &Limits) -> Result<Group, CgroupError> {
        let group = self.vm(vm);
        group.remove()?;
        for dir in group.dirs() {
            std::fs::create_dir(dir).map_err(|source| CgroupError::Create { path: dir.to_path_buf(), source })?;
        }
        group.write_limits(limits)?;
        Ok(group)
    }
}

impl Cgroups {
    /// Gives group `from` (made by [`Cgroups::prepare`], with whatever runs in it) to `vm`
    /// with `limits`, by renaming it: the processes in it are then in `vm`'s group without
    /// being moved (a move into a v1 memory group takes 10-25 ms here). Cgroup v1 only:
    /// v2 refuses renames, and `Ok(None)` says so. A group left by an earlier run of `vm`
    /// is removed first.
    pub fn rename(&self, from: &str, vm: &str, limits: &Limits) -> Result<Option<Group>, CgroupError> {
        if self.version() == Version::V2 {
            return Ok(None);
        }
        let (from, to) = (self.vm(from), self.vm(vm));
        to.remove()?;
        for (old, new) in from.dirs().into_iter().zip(to.dirs()) {
            std::fs::rename(old, new).map_err(|source| CgroupError::Rename {
                from: old.to_path_buf(),
                to: new.to_path_buf(),
                source,
            })?;
        }
        to.write_limits(limits)?;
        Ok(Some(to))
    }
}

/// Writes "+memory +cpu +pids" (and "+io" when the host offers it) to `dir`'s
/// cgroup.subtree_control.
fn enable_controllers(dir: &Path, io: bool) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let value = if io { "+memory +cpu +pids +io" } else { "+memory +cpu +pids" };
    write_file(&path, value).map_err(|source| CgroupError::Write { path, value: value.into(), source })
}

/// One write(2) of `value`, as cgroup files want it.
fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(path)?.write_all(value.as_bytes())
}

fn read_u64(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    match text.trim() {
        "max" => Some(0),
        number => number.parse().ok(),
    }
}

/// The value of `key` in a "key value" per line file (cpu.stat, memory.events, memory.oom_control).
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Group {
    /// Its distinct directories (one on v2; per hierarchy on v1).
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = vec![&self.memory, &self.cpu, &self.pids];
        dirs.extend(self.cpuacct.as_deref());
        dirs.extend(self.io.as_deref());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Writes `limits` into the group's files.
    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let set = |dir: &Path, file: &str, value: String| {
            let path = dir.join(file);
            write_file(&path, &value).map_err(|source| CgroupError::Write { path, value, source })
        };
        let optional = |result: Result<(), CgroupError>| match result {
            // Swap accounting is off on this host: there is no swap limit to set.
            Err(CgroupError::Write { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        match self.version {
            Version::V2 => {
                set(&self.memory, "memory.max", limits.memory_bytes.to_string())?;
                // The limit is the whole footprint: nothing of it goes to swap.
                optional(set(&self.memory, "memory.swap.max", "0".into()))?;
                set(&self.cpu, "cpu.max", format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us))?;
            }
            Version::V1 => {
                // The memory limit may never exceed the memory+swap one: a limit raised (a
                // standby's group given to a VM) raises memory+swap first.
                let memory = limits.memory_bytes.to_string();
                let raised =
                    read_u64(&self.memory.join("memory.limit_in_bytes")).is_some_and(|now| now < limits.memory_bytes);
                if raised {
                    optional(set(&self.memory, "memory.memsw.limit_in_bytes", memory.clone()))?;
                }
                set(&self.memory, "memory.limit_in_bytes", memory.clone())?;
                optional(set(&self.memory, "memory.memsw.limit_in_bytes", memory))?;
                set(&self.cpu, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                set(&self.cpu, "cpu.cfs_quota_us", limits.cpu_quota_us.to_string())?;
            }
        }
        set(&self.pids, "pids.max", limits.tasks.to_string())?;
        self.write_disk_limits(&limits.disk)
    }

    /// One line per device and limit: `io.max` on v2, the `blkio.throttle.*` files on v1.
    fn write_disk_limits(&self, disk: &DiskLimits) -> Result<(), CgroupError> {
        let Some(dir) = &self.io else { return Ok(()) };
        let set = |file: &str, value: String| {
            let path = dir.join(file);
            write_file(&path, &value).map_err(|source| CgroupError::Write { path, value, source })
        };
        for (major, minor) in &disk.devices {
            match self.version {
                Version::V2 => {
                    let mut line = format!("{major}:{minor}");
                    if disk.bytes_per_second > 0 {
                        line += &format!(" rbps={0} wbps={0}", disk.bytes_per_second);
                    }
                    if disk.iops > 0 {
                        line += &format!(" riops={0} wiops={0}", disk.iops);
                    }
                    set("io.max", line)?;
                }
                Version::V1 => {
                    for (limit, files) in [
                        (disk.bytes_per_second, ["blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"]),
                        (disk.iops, ["blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device"]),
                    ] {
                        if limit > 0 {
                            for file in files {
                                set(file, format!("{major}:{minor} {limit}"))?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` of each of its directories, opened for writing. The VMM's
    /// child writes "0" (itself) to each between fork and exec ([`enter_self`]).
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs()
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }

    /// What the group's files say now; a file that cannot be read counts as 0.
    pub fn usage(&self) -> Usage {
        let memory = |file: &str| read_u64(&self.memory.join(file)).unwrap_or(0);
        let pids = |file: &str| read_u64(&self.pids.join(file)).unwrap_or(0);
        match self.version {
            Version::V2 => {
                let current = memory("memory.current");
                let cpu_max = std::fs::read_to_string(self.cpu.join("cpu.max")).unwrap_or_default();
                Usage {
                    memory_current_bytes: current,
                    // memory.peak came with Linux 5.19.
                    memory_peak_bytes: read_u64(&self.memory.join("memory.peak")).unwrap_or(current),
                    memory_limit_bytes: memory("memory.max"),
                    cpu_usage_us: read_key(&self.cpu.join("cpu.stat"), "usage_usec").unwrap_or(0),
                    cpu_quota_us: cpu_max.split_whitespace().next().and_then(|quota| quota.parse().ok()).unwrap_or(0),
                    pids_current: pids("pids.current"),
                    pids_limit: pids("pids.max"),
                    oom_kills: self.oom_kills(),
                }
            }
            Version::V1 => {
                let quota = std::fs::read_to_string(self.cpu.join("cpu.cfs_quota_us")).unwrap_or_default();
                let usage_ns = self.cpuacct.as_ref().and_then(|dir| read_u64(&dir.join("cpuacct.usage"))).unwrap_or(0);
                let limit = memory("memory.limit_in_bytes");
                Usage {
                    memory_current_bytes: memory("memory.usage_in_bytes"),
                    memory_peak_bytes: memory("memory.max_usage_in_bytes"),
                    // v1 says "no limit" with the largest page-aligned number.
                    memory_limit_bytes: if limit >= (1 << 62) { 0 } else { limit },
                    cpu_usage_us: usage_ns / 1000,
                    // -1: no quota.
                    cpu_quota_us: quota.trim().parse().unwrap_or(0),
                    pids_current: pids("pids.current"),
                    pids_limit: pids("pids.max"),
                    oom_kills: self.oom_kills(),
                }
            }
        }
    }

    /// Processes the OOM killer ended in this group (it is made fresh at each start).
    pub fn oom_kills(&self) -> u64 {
        match self.version {
            Version::V2 => read_key(&self.memory.join("memory.events"), "oom_kill").unwrap_or(0),
            // Linux 4.13 added the count to oom_control; before it, a hit limit (failcnt)
            // is the only sign.
            Version::V1 => read_key(&self.memory.join("memory.oom_control"), "oom_kill")
                .unwrap_or_else(|| u64::from(read_u64(&self.memory.join("memory.failcnt")).unwrap_or(0) > 0)),
        }
    }

    /// The memory limit in MiB, for the OOM message.
    pub fn memory_limit_mib(&self) -> u64 {
        let file = match self.version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        read_u64(&self.memory.join(file)).unwrap_or(0) >> 20
    }

    /// Removes the group: whatever still runs in it is killed first (a VMM of an earlier
    /// run nobody tracks any more). A group that is not there is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            if !dir.exists() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if procs.trim().is_empty() {
                    break;
                }
                for pid in procs.lines().filter_map(|line| line.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a process inside this VM's own group.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                if Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Remove { path: dir.to_path_buf(), source }),
            }
        }
        Ok(())
    }

    /// Whether any of its directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|dir| dir.exists())
    }
}

/// Puts the calling process into the groups whose `cgroup.procs` are `fds`, by writing
/// "0" (the writer itself). Only write(2): this runs between fork and exec.
pub fn enter_self(fds: &[i32]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) of one byte from a static buffer to a descriptor the parent
        // opened before the fork; async-signal-safe.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Moves process `pid` (all its threads) into the group whose `cgroup.procs` files are
/// `procs`.
pub fn move_into(procs: &[OwnedFd], pid: u32) -> std::io::Result<()> {
    for fd in procs {
        std::fs::File::from(fd.try_clone()?).write_all(pid.to_string().as_bytes())?;
    }
    Ok(())
}

/// The raw numbers of `fds`, for the closure that runs after the fork.
pub fn raw_fds(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_SELF: &str = "\
8:pids:/
7:blkio:/
4:memory:/process_api/1348
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn a_hybrid_host_without_v2_memory_is_v1_under_the_daemons_group_in_each_hierarchy() {
        let cgroups = Cgroups::locate(V1_MOUNTS, V1_SELF, "carrel", |_| "hugetlb\n".into()).unwrap();
        assert_eq!(cgroups.version, Version::V1);
        assert_eq!(cgroups.memory, Path::new("/sys/fs/cgroup/memory/process_api/1348/carrel"));
        assert_eq!(cgroups.cpu, Path::new("/sys/fs/cgroup/cpu/carrel"));
        assert_eq!(cgroups.cpuacct.as_deref(), Some(Path::new("/sys/fs/cgroup/cpuacct/carrel")));
        assert_eq!(cgroups.pids, Path::new("/sys/fs/cgroup/pids/carrel"));
        assert_eq!(cgroups.io.as_deref(), Some(Path::new("/sys/fs/cgroup/blkio/carrel")));
        let vm = cgroups.vm("agent-1");
        assert_eq!(vm.dirs().len(), 5);
    }

    #[test]
    fn co_mounted_controllers_share_one_directory() {
        let mounts = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                      35 31 0:32 /lxc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let own = "5:cpu,cpuacct:/a\n4:memory:/lxc/b\n3:pids:/c\n";
        let cgroups = Cgroups::locate(mounts, own, "carrel", |_| String::new()).unwrap();
        assert_eq!(cgroups.cpu, cgroups.cpuacct.clone().unwrap());
        // The memory mount is the sub-tree /lxc: the path is taken relative to it.
        assert_eq!(cgroups.memory, Path::new("/sys/fs/cgroup/memory/b/carrel"));
        assert_eq!(cgroups.vm("x").dirs().len(), 3);
    }

    #[test]
    fn a_host_without_the_controllers_has_no_cgroups() {
        let mounts = "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        assert!(Cgroups::locate(mounts, "3:pids:/\n", "carrel", |_| String::new()).is_err());
    }

    #[test]
    fn a_cgroup2_root_with_memory_is_v2_under_the_daemons_group() {
        let mounts = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/carreld.service\n";
        let cgroups = Cgroups::locate(mounts, own, "carrel", |root| {
            assert_eq!(root, Path::new("/sys/fs/cgroup"));
            "cpuset cpu io memory hugetlb pids rdma misc\n".into()
        })
        .unwrap();
        assert_eq!(cgroups.version, Version::V2);
        let dir = Path::new("/sys/fs/cgroup/system.slice/carreld.service/carrel");
        assert_eq!((cgroups.memory.as_path(), cgroups.cpu.as_path(), cgroups.pids.as_path()), (dir, dir, dir));
        assert_eq!(cgroups.io.as_deref(), Some(dir), "the io controller is offered");
        assert_eq!(cgroups.vm("a").dirs(), [dir.join("a")]);
    }

    #[test]
    fn limits_follow_the_config() {
        let limits = Limits::for_vm(256, 2, None);
        assert_eq!(limits.memory_bytes, (256 + VMM_OVERHEAD_MIB) << 20);
        assert_eq!(limits.cpu_quota_us, 250_000);
        assert_eq!(limits.tasks, 2 + TASK_MARGIN);
        assert_eq!(Limits::for_vm(256, 1, Some(160)).memory_bytes, 160 << 20);
    }

    /// A v1 hierarchy per controller, in directories standing in for cgroupfs.
    #[test]
    fn a_v1_group_is_given_to_a_vm_by_renaming_it_and_v2_declines() {
        let root = tempfile::tempdir().unwrap();
        let parent = |controller: &str| {
            let dir = root.path().join(controller).join("carrel");
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
        let cgroups = Cgroups::of(Group {
            version: Version::V1,
            memory: parent("memory"),
            cpu: parent("cpu"),
            cpuacct: None,
            pids: parent("pids"),
            io: None,
        });
        let waiting = cgroups.vm(".standby");
        for (dir, files) in [
            (&waiting.memory, &["memory.limit_in_bytes"][..]),
            (&waiting.cpu, &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..]),
            (&waiting.pids, &["pids.max"][..]),
        ] {
            std::fs::create_dir(dir).unwrap();
            for file in files {
                std::fs::write(dir.join(file), "").unwrap();
            }
        }
        let limits = Limits::for_vm(128, 1, None);
        let group = cgroups.rename(".standby", "vm", &limits).unwrap().expect("v1 renames");
        assert_eq!(group, cgroups.vm("vm"));
        assert!(!waiting.exists(), "the waiting group is the VM's now");
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(read(&group.memory, "memory.limit_in_bytes"), limits.memory_bytes.to_string());
        assert_eq!(read(&group.cpu, "cpu.cfs_quota_us"), limits.cpu_quota_us.to_string());
        assert_eq!(read(&group.pids, "pids.max"), limits.tasks.to_string());

        let v2 = Cgroups::of(Group { version: Version::V2, ..cgroups.parent.clone() });
        assert_eq!(v2.rename(".standby", "other", &limits).unwrap(), None, "v2 has no renames");
    }

    /// A v2 group's files as the kernel names them, in a directory standing in for cgroupfs.
    #[test]
    fn v2_limits_and_usage_use_the_v2_files() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("carrel");
        std::fs::create_dir(&parent).unwrap();
        let cgroups = Cgroups::of(Group {
            version: Version::V2,
            memory: parent.clone(),
            cpu: parent.clone(),
            cpuacct: None,
            pids: parent.clone(),
            io: Some(parent.clone()),
        });
        let mut limits = Limits::for_vm(128, 1, None);
        limits.disk = DiskLimits { devices: vec![(8, 16)], bytes_per_second: 8 << 20, iops: 0 };
        // Files a real cgroupfs makes on mkdir; here they are made by hand.
        let group = cgroups.vm("vm");
        std::fs::create_dir(&group.memory).unwrap();
        for file in ["memory.max", "cpu.max", "pids.max", "io.max"] {
            std::fs::write(group.memory.join(file), "").unwrap();
        }
        group.write_limits(&limits).unwrap();
        assert_eq!(std::fs::read_to_string(group.memory.join("cpu.max")).unwrap(), "150000 100000");
        assert_eq!(std::fs::read_to_string(group.memory.join("io.max")).unwrap(), "8:16 rbps=8388608 wbps=8388608");
        std::fs::write(group.memory.join("memory.current"), "12345\n").unwrap();
        std::fs::write(group.memory.join("memory.peak"), "23456\n").unwrap();
        std::fs::write(group.memory.join("cpu.stat"), "usage_usec 777\nuser_usec 700\n").unwrap();
        std::fs::write(group.memory.join("pids.current"), "4\n").unwrap();
        std::fs::write(group.memory.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let usage = group.usage();
        assert_eq!(
            usage,
            Usage {
                memory_current_bytes: 12345,
                memory_peak_bytes: 23456,
                memory_limit_bytes: (128 + VMM_OVERHEAD_MIB) << 20,
                cpu_usage_us: 777,
                cpu_quota_us: 150_000,
                pids_current: 4,
                pids_limit: 1 + TASK_MARGIN,
                oom_kills: 1,
            }
        );
        assert_eq!(group.memory_limit_mib(), 128 + VMM_OVERHEAD_MIB);
    }

    #[test]
    fn v1_oom_kills_come_from_oom_control() {
        let root = tempfile::tempdir().unwrap();
        let group = Group {
            version: Version::V1,
            memory: root.path().into(),
            cpu: root.path().into(),
            cpuacct: None,
            pids: root.path().into(),
            io: None,
        };
        std::fs::write(root.path().join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
            .unwrap();
        assert_eq!(group.oom_kills(), 2);
        std::fs::write(root.path().join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(group.usage().memory_limit_bytes, 0, "v1's no-limit number reads as no limit");
    }
}
