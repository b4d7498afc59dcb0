//! `carrel-vmm`'s command line: its commands and flags with their help (clap's derive),
//! and what each asks for in the VMM's own terms (a `VmConfig`, a control request).
//! Usage errors, including those found after parsing, go through clap: exit code 2,
//! the message, and the command's usage line.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand, ValueEnum};

use carrel_vmm::boot::BootProtocol;
use carrel_vmm::builder::MemoryLoad;
use carrel_vmm::config::VmConfig;
use carrel_vmm::control::{
    AgentExec, AgentRequest, ImageFormat, InputRequest, ScreenshotRequest, SnapshotRequest, Wait,
};
use carrel_vmm::disk::DiskSpec;
use carrel_vmm::input::{Action, Button};
use carrel_vmm::jail::JailConfig;

/// Carrel's virtual machine monitor: one process per agent VM.
#[derive(Debug, Parser)]
#[command(
    name = "carrel-vmm",
    about = "Carrel's virtual machine monitor: run a VM, or talk to a running VM's control socket",
    long_about = "Carrel's virtual machine monitor: run a VM (one process per VM), or talk to a \
                  running VM's control socket: screenshots, input, the guest agent, snapshots.\n\n\
                  Exit codes: 0 done; 1 an error; 2 a usage error; `run` ends with the guest's \
                  power-off code; `agent exec` with the guest command's code.",
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM (or wake one from a snapshot with --restore) and run it until it ends.
    #[command(after_help = "Flags override the --config file. A restore takes the machine from the snapshot's \
                            vm.json and only where the VM talks from the flags.")]
    Run(Box<RunArgs>),
    /// Save a running VM into a new snapshot directory; the VM goes on.
    Snapshot(SnapshotCommand),
    /// Save a running VM into a new snapshot directory, then end its process (wake it with
    /// `run --restore`).
    Hibernate(SnapshotArgs),
    /// Make, describe and fold disk layers.
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
    /// A running VM's state: platform, boot, vCPUs, memory, screen, devices, uptime.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// End a running VM (its process exits 0).
    Stop(SocketArg),
    /// Pause a running VM's vCPUs.
    Pause(SocketArg),
    /// Let a paused VM's vCPUs run again.
    Resume(SocketArg),
    /// Save the screen of a running VM, or of a hibernated one from its snapshot.
    Screenshot(ScreenshotArgs),
    /// Talk to the guest agent: run commands, move files.
    Agent(AgentArgs),
    /// Act on the pointer or keyboard, wait for the frame that shows it, and look.
    Input(InputArgs),
    /// Print a shell completion script: `carrel-vmm completions bash > /etc/bash_completion.d/carrel-vmm`.
    Completions { shell: clap_complete::Shell },
    /// Start ahead of need, for a supervisor such as carreld, and wait on stdin for the
    /// command line to run: one line of JSON, `{"args": ["run", ...], "stderr": PATH}`.
    #[command(hide = true)]
    Standby,
}

/// A running VM's control socket.
#[derive(Debug, Args)]
pub struct SocketArg {
    /// The VM's control socket (its `run --socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
}

/// `run`: a fresh boot's machine, or a restore; where the VM talks; its confinement.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub machine: MachineArgs,

    /// Wake the VM saved in this snapshot directory. The machine (kernel, memory, CPUs,
    /// disks, screen) is the snapshot's, so the machine flags are refused with it.
    #[arg(long, value_name = "DIR", help_heading = "Restore")]
    pub restore: Option<PathBuf>,
    /// Load all guest memory, checked, before the guest runs.
    #[arg(long, requires = "restore", overrides_with = "lazy", help_heading = "Restore")]
    pub eager: bool,
    /// Load guest memory on first touch (userfaultfd), and fail where that is unavailable
    /// (the default loads lazily where it can, else eagerly).
    #[arg(long, requires = "restore", overrides_with = "eager", help_heading = "Restore")]
    pub lazy: bool,
    /// The new top layer of the snapshot's next writable disk, over the layers the
    /// snapshot froze (default: the path the snapshot's VM wrote); repeatable, in disk
    /// order. A VM started from another's snapshot (a template) writes its own layer.
    #[arg(long, value_name = "PATH", requires = "restore", help_heading = "Restore")]
    pub disk_top: Vec<PathBuf>,

    #[command(flatten)]
    pub talk: TalkArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// The flags of a restore, which takes the machine from the snapshot.
const RESTORE_FLAGS: [&str; 4] = ["restore", "eager", "lazy", "disk_top"];

/// The machine of a fresh boot: each flag refused with `--restore`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Machine (a fresh boot)")]
pub struct MachineArgs {
    /// Read the VM from this TOML file, under the flags' names (kernel, initrd, cmdline,
    /// mem, cpus, console_log, console_stdout, socket, boot, rng, vsock, guest_cid, audit,
    /// name, display, and [[disk]] tables with path, readonly, base, size).
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The guest kernel: the Desk kernel, a Linux bzImage or ELF, or a PVH ELF.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// An initrd for a Linux guest.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (a default for the guest kind when not given).
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "S", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 128].
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "MiB")]
    pub mem: Option<u64>,
    /// vCPUs [default: 1].
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "N")]
    pub cpus: Option<u64>,
    /// The boot protocol [default: auto: from the image].
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "PROTOCOL", value_parser = ["auto", "desk", "linux", "pvh"])]
    pub boot: Option<String>,
    /// No virtio-rng device.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS)]
    pub no_rng: bool,
    /// The screen's size [default: 1280x800, up to 3840x2160].
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "WxH", overrides_with = "no_display")]
    pub display: Option<String>,
    /// No screen.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, overrides_with = "display")]
    pub no_display: bool,
    /// Run the screen in a vhost-user backend (carrel-gpu-backend) listening here.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "VHOST.sock")]
    pub gpu_backend: Option<PathBuf>,
    /// That backend's screen socket (its --screen-socket): screenshots and input waits.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "SCREEN.sock")]
    pub gpu_screen: Option<PathBuf>,
    /// A virtio-blk disk, repeatable: a raw image written in place; `readonly`; `base=RAW`
    /// for a layer over a shared read-only raw base; `size=N[K|M|G]` to make an empty layer
    /// if PATH does not exist.
    #[arg(long, conflicts_with_all = RESTORE_FLAGS, value_name = "PATH[,readonly][,base=RAW][,size=N]")]
    pub disk: Vec<DiskSpec>,
}

/// Where the VM talks and who it is: for a boot and a restore alike.
#[derive(Debug, Args)]
#[command(next_help_heading = "Where the VM talks (a boot or a restore)")]
pub struct TalkArgs {
    /// Serve the VM's control socket here.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Attach virtio-vsock, its host side at this Unix socket (`CONNECT <port>` to reach a
    /// guest port; guest connections to host port P go to PATH_P).
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID [default: 3].
    #[arg(long, value_name = "N")]
    pub cid: Option<u64>,
    /// The VM's name, tied to its audit log [default: vm].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Record every control request in the audit log in this directory.
    #[arg(long, value_name = "DIR")]
    pub audit: Option<PathBuf>,
    /// Also write the guest's console to this file.
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Do not write the guest's console to stdout.
    #[arg(long)]
    pub no_console: bool,
}

/// How the VMM process itself is confined, for a boot and a restore alike.
#[derive(Debug, Args)]
#[command(next_help_heading = "Confinement (a boot or a restore)")]
pub struct ProcessArgs {
    /// Jail the VMM: namespaces of its own, and an empty directory for its root, into which
    /// only what the VM needs is bound. Needs --uid and --gid.
    #[arg(long, value_name = "DIR")]
    pub jail: Option<PathBuf>,
    /// The uid the jailed VMM becomes once the VM is built.
    #[arg(long, value_name = "U")]
    pub uid: Option<u32>,
    /// The gid the jailed VMM becomes once the VM is built.
    #[arg(long, value_name = "G")]
    pub gid: Option<u32>,
    /// Another directory the jailed VM may write, such as where its snapshots go; repeatable.
    #[arg(long, value_name = "DIR")]
    pub jail_writable: Vec<PathBuf>,
    /// Another directory the jailed VM may read, such as where a template's disk layers
    /// are; repeatable.
    #[arg(long, value_name = "DIR")]
    pub jail_readable: Vec<PathBuf>,
    /// No seccomp filters (they are on by default).
    #[arg(long)]
    pub no_seccomp: bool,
    /// A check run inside the jail once it is set up (builds with the test-probes feature only).
    #[arg(long, value_name = "NAME", hide = true)]
    pub jail_probe: Vec<String>,
}

/// How the VMM process itself is confined, for `run` and `run --restore` alike.
#[derive(Debug, Default)]
pub struct ProcessOptions {
    pub jail: Option<JailConfig>,
    pub seccomp: bool,
    /// Checks run inside the jail once it is set up (test builds only).
    #[cfg_attr(not(feature = "test-probes"), allow(dead_code))]
    pub probes: Vec<String>,
}

impl ProcessArgs {
    /// The confinement asked for: all of --jail, --uid and --gid, or none of them.
    pub fn options(self) -> Result<ProcessOptions, clap::Error> {
        if !cfg!(feature = "test-probes") && !self.jail_probe.is_empty() {
            return Err(usage_error(&["run"], "--jail-probe needs a carrel-vmm built with the test-probes feature"));
        }
        let jail =
            match (self.jail, self.uid, self.gid) {
                (None, None, None) if self.jail_writable.is_empty() && self.jail_readable.is_empty() => None,
                (Some(root), Some(uid), Some(gid)) => Some(JailConfig {
                    root: absolute(&root),
                    uid,
                    gid,
                    writable: self.jail_writable.iter().map(|dir| absolute(dir)).collect(),
                    readable: self.jail_readable.iter().map(|dir| absolute(dir)).collect(),
                }),
                _ => return Err(usage_error(
                    &["run"],
                    "--jail DIR, --uid U and --gid G go together (and --jail-writable and --jail-readable need them)",
                )),
            };
        Ok(ProcessOptions { jail, seccomp: !self.no_seccomp, probes: self.jail_probe })
    }
}

/// What a restore may set anew: the VM's identity and where it talks, never its machine.
#[derive(Debug, Default)]
pub struct RestoreOverrides {
    pub load: MemoryLoad,
    pub socket: Option<PathBuf>,
    pub vsock: Option<PathBuf>,
    pub cid: Option<u64>,
    pub name: Option<String>,
    pub audit: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    pub no_console: bool,
    /// New top layers for the writable disks, in order.
    pub disk_tops: Vec<PathBuf>,
}

/// What `run` was asked to do.
#[derive(Debug)]
pub enum Launch {
    Boot(Box<VmConfig>),
    Restore { dir: PathBuf, overrides: RestoreOverrides },
}

impl RunArgs {
    /// A fresh boot's configuration (the --config file first, the flags over it), or a
    /// restore's directory and what the flags set anew.
    pub fn launch(self) -> Result<(Launch, ProcessArgs), clap::Error> {
        let RunArgs { machine, restore, eager, lazy, disk_top, talk, process } = self;
        if let Some(dir) = restore {
            let load = match (eager, lazy) {
                (true, _) => MemoryLoad::Eager,
                (_, true) => MemoryLoad::Lazy,
                _ => MemoryLoad::LazyIfPossible,
            };
            let overrides = RestoreOverrides {
                load,
                socket: talk.socket,
                vsock: talk.vsock,
                cid: talk.cid,
                name: talk.name,
                audit: talk.audit,
                console_log: talk.console_log,
                no_console: talk.no_console,
                disk_tops: disk_top.iter().map(|path| absolute(path)).collect(),
            };
            return Ok((Launch::Restore { dir, overrides }, process));
        }
        let mut config = match &machine.config {
            Some(path) => VmConfig::from_file(path).map_err(|err| usage_error(&["run"], err))?,
            None => VmConfig::default(),
        };
        let MachineArgs {
            config: _,
            kernel,
            initrd,
            cmdline,
            mem,
            cpus,
            boot,
            no_rng,
            display,
            no_display,
            gpu_backend,
            gpu_screen,
            disk,
        } = machine;
        let set = |field: &mut Option<PathBuf>, value: Option<PathBuf>| {
            if value.is_some() {
                *field = value;
            }
        };
        set(&mut config.kernel, kernel);
        set(&mut config.initrd, initrd);
        config.cmdline = cmdline.or(config.cmdline);
        config.mem_mib = mem.unwrap_or(config.mem_mib);
        config.cpus = cpus.unwrap_or(config.cpus);
        if let Some(boot) = boot {
            config.boot = boot.parse::<BootProtocol>().map_err(|err| usage_error(&["run"], err))?;
        }
        config.rng &= !no_rng;
        if no_display {
            config.display = "none".to_string();
        } else if let Some(display) = display {
            config.display = display;
        }
        set(&mut config.gpu_backend, gpu_backend);
        set(&mut config.gpu_screen, gpu_screen);
        config.disks.extend(disk);
        set(&mut config.socket, talk.socket);
        set(&mut config.vsock, talk.vsock);
        config.guest_cid = talk.cid.unwrap_or(config.guest_cid);
        config.name = talk.name.unwrap_or(config.name);
        set(&mut config.audit, talk.audit);
        set(&mut config.console_log, talk.console_log);
        config.console_stdout &= !talk.no_console;
        Ok((Launch::Boot(Box::new(config)), process))
    }
}

/// `snapshot`: take one, or `snapshot merge` to fold a diff chain.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotCommand {
    #[command(subcommand)]
    pub merge: Option<SnapshotSubcommand>,
    #[command(flatten)]
    pub take: SnapshotArgs,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotSubcommand {
    /// Fold a diff chain into one full snapshot.
    Merge {
        /// The last snapshot of the chain.
        #[arg(long, value_name = "DIFF")]
        dir: PathBuf,
        /// The merged snapshot's directory (new).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Which VM to save and where.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's control socket (its `run --socket`).
    #[arg(long, value_name = "PATH", required = true)]
    pub socket: Option<PathBuf>,
    /// The new snapshot's directory (never overwritten).
    #[arg(long, value_name = "DIR", required = true)]
    pub dir: Option<PathBuf>,
    /// Save only what changed since the VM's last snapshot, or the one it was restored from.
    #[arg(long)]
    pub diff: bool,
}

impl SnapshotArgs {
    /// The socket and the request; `None` only when clap let the flags out (`snapshot merge`).
    pub fn request(self, hibernate: bool) -> Option<(PathBuf, SnapshotRequest)> {
        Some((self.socket?, SnapshotRequest { dir: absolute(&self.dir?), hibernate, diff: self.diff }))
    }
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Make a new layer: empty (--size), or over a read-only raw base (--base).
    Create {
        /// The new layer's file.
        path: PathBuf,
        /// The empty layer's size, such as 64M or 8G.
        #[arg(long, value_name = "N[K|M|G]", value_parser = disk_size, required_unless_present = "base", conflicts_with = "base")]
        size: Option<u64>,
        /// A raw image the layer lies over (its size is the disk's).
        #[arg(long, value_name = "RAW")]
        base: Option<PathBuf>,
    },
    /// A disk's size, layers, base and MiB written.
    Info {
        /// The disk (a layer or a raw image).
        path: PathBuf,
    },
    /// Fold PATH's chain of frozen layers into one layer over the same base: in place, or
    /// into --out (the frozen layers stay).
    Commit {
        /// The disk's top layer.
        path: PathBuf,
        /// Write the folded layer here instead of in place.
        #[arg(long, value_name = "LAYER")]
        out: Option<PathBuf>,
    },
}

/// Where a screenshot comes from: a running VM, or a hibernated VM's snapshot.
#[derive(Debug)]
pub enum ScreenTarget {
    Socket(PathBuf),
    Snapshot(PathBuf),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Png,
    Qoi,
    /// The scanout's pixels as they are.
    Raw,
}

impl From<FormatArg> for ImageFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Png => ImageFormat::Png,
            FormatArg::Qoi => ImageFormat::Qoi,
            FormatArg::Raw => ImageFormat::Raw,
        }
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["socket", "snapshot"])))]
pub struct ScreenshotArgs {
    /// A running VM's control socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// A hibernated VM's snapshot directory: its screen, without waking it.
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
    /// Write the image here.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// The encoding [default: from FILE's extension (.qoi, .raw), else png].
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Scale the image to this size.
    #[arg(long, value_name = "WxH", value_parser = width_height)]
    pub scale: Option<(u32, u32)>,
    /// Only this rectangle of the screen.
    #[arg(long, value_name = "x,y,w,h", value_parser = rectangle)]
    pub crop: Option<[u32; 4]>,
    /// Draw the pointer.
    #[arg(long)]
    pub cursor: bool,
    /// Wait for a frame after this one [default: the first frame].
    #[arg(long, value_name = "FRAME", overrides_with = "still")]
    pub after: Option<u64>,
    /// Wait until the screen has been still for this many milliseconds.
    #[arg(long, value_name = "MS", overrides_with = "after")]
    pub still: Option<u64>,
    /// Give up the wait after this many seconds.
    #[arg(long, value_name = "S", default_value = "10", value_parser = seconds)]
    pub timeout: u64,
}

impl ScreenshotArgs {
    /// The source, the output file and the request.
    pub fn request(self) -> (ScreenTarget, PathBuf, ScreenshotRequest) {
        // The file name decides when no --format is given.
        let format = self.format.map(ImageFormat::from).unwrap_or_else(|| format_of(&self.output));
        let wait = match (self.after, self.still) {
            (Some(frame), _) => Wait::FrameAfter(frame),
            (_, Some(ms)) => Wait::StillFor(ms),
            _ => Wait::FirstFrame,
        };
        let request = ScreenshotRequest {
            format,
            crop: self.crop,
            scale: self.scale.map(|(width, height)| [width, height]),
            cursor: self.cursor,
            wait,
            timeout_ms: self.timeout,
        };
        let target = match (self.socket, self.snapshot) {
            (Some(socket), _) => ScreenTarget::Socket(socket),
            (None, dir) => ScreenTarget::Snapshot(dir.unwrap_or_default()),
        };
        (target, self.output, request)
    }
}

/// An image format from a file's extension: .qoi, .raw, else PNG.
fn format_of(path: &Path) -> ImageFormat {
    match path.extension().and_then(|ext| ext.to_str()) {
        Some("qoi") => ImageFormat::Qoi,
        Some("raw") => ImageFormat::Raw,
        _ => ImageFormat::Png,
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The VM's control socket (its `run --socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: AgentSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentSubcommand {
    /// Check that the guest agent answers; prints the round trip.
    Ping,
    /// List a guest directory.
    Ls {
        #[arg(default_value = "/")]
        path: String,
    },
    /// Remove a guest file.
    Rm { path: String },
    /// Copy a local file into the guest (checked by blake3 end to end).
    Put { local: PathBuf, remote: String },
    /// Copy a guest file out (a failed get leaves LOCAL as it was).
    Get { remote: String, local: PathBuf },
    /// Run a command in the guest; prints its output and exits with its exit code (128 +
    /// the signal when killed, 124 on timeout).
    Exec(ExecArgs),
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Kill the command after this many seconds [default: an hour].
    #[arg(long, value_name = "S", value_parser = seconds)]
    pub timeout: Option<u64>,
    /// The guest directory to run it in.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Set an environment variable for the command; repeatable.
    #[arg(long, value_name = "K=V", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments (after `--` when one starts with a dash).
    #[arg(value_name = "CMD", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub argv: Vec<String>,
}

/// An agent command: a request, or a file transfer whose local side this CLI opens.
#[derive(Debug)]
pub enum AgentCommand {
    Request(AgentRequest),
    Put { local: PathBuf, remote: String },
    Get { remote: String, local: PathBuf },
}

impl From<AgentSubcommand> for AgentCommand {
    fn from(command: AgentSubcommand) -> Self {
        let request = match command {
            AgentSubcommand::Ping => AgentRequest::Ping,
            AgentSubcommand::Ls { path } => AgentRequest::List { path },
            AgentSubcommand::Rm { path } => AgentRequest::Remove { path, recursive: false },
            AgentSubcommand::Put { local, remote } => return AgentCommand::Put { local, remote },
            AgentSubcommand::Get { remote, local } => return AgentCommand::Get { remote, local },
            AgentSubcommand::Exec(exec) => AgentRequest::Exec(AgentExec {
                argv: exec.argv,
                env: exec.env,
                cwd: exec.cwd,
                timeout_ms: exec.timeout,
                ..AgentExec::default()
            }),
        };
        AgentCommand::Request(request)
    }
}

#[derive(Debug, Args)]
pub struct InputArgs {
    /// The VM's control socket (its `run --socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// What to wait for after the action: the next frame, nothing, or a still screen.
    #[arg(long, value_name = "frame|none|still:MS", default_value = "frame", value_parser = wait, global = true)]
    pub wait: WaitArg,
    /// Give up the wait after this many seconds.
    #[arg(long, value_name = "S", default_value = "5", value_parser = seconds, global = true)]
    pub timeout: u64,
    /// After the wait, save the screen here (.png, .qoi or .raw).
    #[arg(long, value_name = "FILE", global = true)]
    pub screenshot: Option<PathBuf>,
    /// How long keys and buttons are held down, in milliseconds.
    #[arg(long, value_name = "MS", global = true)]
    pub hold: Option<u64>,
    /// The pause between keystrokes, in milliseconds.
    #[arg(long, value_name = "MS", global = true)]
    pub gap: Option<u64>,
    #[command(subcommand)]
    pub action: InputAction,
}

/// `--wait`: `None` returns at once.
#[derive(Debug, Clone, Copy)]
pub struct WaitArg(Option<Wait>);

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ButtonArg {
    Left,
    Right,
    Middle,
}

impl From<ButtonArg> for Button {
    fn from(button: ButtonArg) -> Self {
        match button {
            ButtonArg::Left => Button::Left,
            ButtonArg::Right => Button::Right,
            ButtonArg::Middle => Button::Middle,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum InputAction {
    /// Click at X Y (pixels).
    Click {
        x: u32,
        y: u32,
        #[arg(long, value_enum, default_value = "left")]
        button: ButtonArg,
        /// 2 for a double click.
        #[arg(long, value_name = "N", default_value_t = 1)]
        count: u32,
    },
    /// Move the pointer to X Y.
    Move { x: u32, y: u32 },
    /// Press a button and keep it down.
    Down {
        #[arg(value_enum, default_value = "left")]
        button: ButtonArg,
    },
    /// Let a button go.
    Up {
        #[arg(value_enum, default_value = "left")]
        button: ButtonArg,
    },
    /// Press at X1 Y1, move through each point, release at the last.
    Drag {
        #[arg(long, value_enum, default_value = "left")]
        button: ButtonArg,
        /// X1 Y1 X2 Y2 [X Y]...: two or more points, in pixels.
        #[arg(value_name = "X Y", required = true)]
        points: Vec<u32>,
    },
    /// Scroll at X Y by DX DY wheel notches (DY > 0 scrolls up, DX > 0 right).
    #[command(allow_negative_numbers = true)]
    Scroll { x: u32, y: u32, dx: i32, dy: i32 },
    /// Type TEXT on a US keyboard (printable ASCII, newline and tab).
    Type {
        #[arg(allow_hyphen_values = true)]
        text: String,
    },
    /// Press a key combination such as ctrl+a or ctrl+shift+t.
    Key {
        #[arg(allow_hyphen_values = true)]
        combo: String,
    },
}

impl InputArgs {
    /// The socket, where to save the screenshot, and the request.
    pub fn request(self) -> Result<(PathBuf, Option<PathBuf>, InputRequest), clap::Error> {
        let action = match self.action {
            InputAction::Click { x, y, button, count } => Action::Click { x, y, button: button.into(), count },
            InputAction::Move { x, y } => Action::Move { x, y },
            InputAction::Down { button } => Action::ButtonDown { button: button.into() },
            InputAction::Up { button } => Action::ButtonUp { button: button.into() },
            InputAction::Drag { button, points } => {
                if points.len() < 4 || points.len() % 2 != 0 {
                    return Err(usage_error(&["input", "drag"], "drag takes two or more points: X1 Y1 X2 Y2 [X Y]..."));
                }
                Action::Drag { button: button.into(), path: points.chunks(2).map(|pair| (pair[0], pair[1])).collect() }
            }
            InputAction::Scroll { x, y, dx, dy } => Action::Scroll { x, y, dx, dy },
            InputAction::Type { text } => Action::Type { text },
            InputAction::Key { combo } => Action::Key { combo },
        };
        let request = InputRequest {
            action,
            wait: self.wait.0,
            screenshot: self.screenshot.as_deref().map(format_of),
            timeout_ms: self.timeout,
            hold_ms: self.hold,
            gap_ms: self.gap,
        };
        Ok((self.socket, self.screenshot, request))
    }
}

/// A usage error found after parsing, said the way clap says its own: the message and
/// the usage of the command at `path` (such as `["input", "drag"]`), exit code 2.
pub fn usage_error(path: &[&str], message: impl Display) -> clap::Error {
    let mut command = Cli::command();
    command.build();
    let mut target = &mut command;
    for name in path {
        target = target.find_subcommand_mut(name).expect("usage_error names a carrel-vmm command");
    }
    target.error(ErrorKind::ValueValidation, message)
}

/// Local paths are opened by the VMM process, which may run elsewhere: make them absolute.
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir().map(|dir| dir.join(path)).unwrap_or_else(|_| path.to_path_buf())
}

/// Seconds, fractions allowed, as milliseconds.
fn seconds(text: &str) -> Result<u64, String> {
    let seconds: f64 = text.parse().map_err(|_| "takes seconds, such as 5 or 0.5".to_string())?;
    Ok((seconds.max(0.0) * 1000.0) as u64)
}

/// `WIDTHxHEIGHT`.
fn width_height(text: &str) -> Result<(u32, u32), String> {
    let bad = || "takes WIDTHxHEIGHT, such as 640x400".to_string();
    let (width, height) = text.split_once('x').ok_or_else(bad)?;
    Ok((width.parse().map_err(|_| bad())?, height.parse().map_err(|_| bad())?))
}

/// `x,y,w,h`.
fn rectangle(text: &str) -> Result<[u32; 4], String> {
    let bad = || "takes four whole numbers x,y,w,h".to_string();
    let parts: Vec<u32> = text.split(',').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
    parts.try_into().map_err(|_| bad())
}

/// `K=V`.
fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or("takes K=V")?;
    Ok((key.to_string(), value.to_string()))
}

/// A disk size: bytes, or with K, M or G.
fn disk_size(text: &str) -> Result<u64, String> {
    carrel_vmm::disk::parse_size(text).ok_or_else(|| "takes a size such as 64M or 8G".to_string())
}

/// `frame`, `none` or `still:MS`.
fn wait(text: &str) -> Result<WaitArg, String> {
    match text {
        "frame" => Ok(WaitArg(Some(Wait::FrameAfter(0)))),
        "none" => Ok(WaitArg(None)),
        other => other
            .strip_prefix("still:")
            .and_then(|ms| ms.parse().ok())
            .map(|ms| WaitArg(Some(Wait::StillFor(ms))))
            .ok_or_else(|| "takes frame, none or still:MS".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("carrel-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_override_defaults_and_keep_disks_in_order() {
        let Command::Run(run) =
            parse(&["run", "--kernel", "k.elf", "--mem", "64", "--disk", "a.raw", "--disk", "b,readonly", "--no-rng"])
                .unwrap()
                .command
        else {
            panic!("not run")
        };
        let (Launch::Boot(config), _) = run.launch().unwrap() else { panic!("not a boot") };
        assert_eq!(config.kernel, Some(PathBuf::from("k.elf")));
        assert_eq!((config.mem_mib, config.cpus, config.rng), (64, 1, false));
        assert_eq!(config.disks.iter().map(|disk| disk.readonly).collect::<Vec<_>>(), [false, true]);
    }

    #[test]
    fn run_restore_refuses_machine_flags_with_usage_error() {
        let error = parse(&["run", "--restore", "/s", "--mem", "64"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ArgumentConflict);
        assert!(parse(&["run", "--restore", "/s", "--lazy", "--socket", "c.sock", "--jail-writable", "/w"]).is_ok());
        assert!(parse(&["run", "--kernel", "k", "--eager"]).is_err(), "--eager is for a restore");
        assert!(parse(&["run", "--lazy"]).is_err(), "--lazy needs --restore");
    }

    #[test]
    fn jail_without_uid_and_gid_is_a_usage_error() {
        let Command::Run(run) = parse(&["run", "--kernel", "k", "--jail", "/j"]).unwrap().command else {
            panic!("not run")
        };
        let error = run.launch().unwrap().1.options().unwrap_err();
        assert!(error.to_string().contains("go together"), "{error}");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn snapshot_takes_flags_or_merge_but_not_both() {
        assert!(parse(&["snapshot", "--socket", "s", "--dir", "d", "--diff"]).is_ok());
        assert!(parse(&["snapshot", "merge", "--dir", "d", "--out", "o"]).is_ok());
        assert!(parse(&["snapshot", "--socket", "s"]).is_err(), "--dir is required");
        assert!(parse(&["snapshot", "--socket", "s", "--dir", "d", "merge", "--dir", "d", "--out", "o"]).is_err());
    }

    #[test]
    fn agent_exec_keeps_dashes_in_the_command() {
        let Command::Agent(agent) =
            parse(&["agent", "--socket", "s", "exec", "--timeout", "1.5", "--env", "A=b", "--", "ls", "-l"])
                .unwrap()
                .command
        else {
            panic!("not agent")
        };
        let AgentCommand::Request(AgentRequest::Exec(exec)) = agent.command.into() else { panic!("not exec") };
        assert_eq!(
            (exec.argv, exec.env, exec.timeout_ms),
            (vec!["ls".into(), "-l".into()], vec![("A".into(), "b".into())], Some(1500))
        );
        let Command::Agent(agent) = parse(&["agent", "--socket", "s", "exec", "echo", "-n", "hi"]).unwrap().command
        else {
            panic!("not agent")
        };
        let AgentCommand::Request(AgentRequest::Exec(exec)) = agent.command.into() else { panic!("not exec") };
        assert_eq!(exec.argv, ["echo", "-n", "hi"]);
    }

    #[test]
    fn input_actions_parse_to_their_requests() {
        let request = |args: &[&str]| match parse(args).unwrap().command {
            Command::Input(input) => input.request(),
            other => panic!("{other:?}"),
        };
        let (_, shot, click) =
            request(&["input", "--socket", "s", "click", "1", "2", "--button", "right", "--screenshot", "a.qoi"])
                .unwrap();
        assert_eq!(click.action, Action::Click { x: 1, y: 2, button: Button::Right, count: 1 });
        assert_eq!((shot, click.screenshot), (Some(PathBuf::from("a.qoi")), Some(ImageFormat::Qoi)));
        let (_, _, scroll) =
            request(&["input", "--socket", "s", "--wait", "none", "scroll", "5", "6", "0", "-3"]).unwrap();
        assert_eq!((scroll.action, scroll.wait), (Action::Scroll { x: 5, y: 6, dx: 0, dy: -3 }, None));
        let (_, _, drag) = request(&["input", "--socket", "s", "drag", "1", "2", "3", "4", "5", "6"]).unwrap();
        assert_eq!(drag.action, Action::Drag { button: Button::Left, path: vec![(1, 2), (3, 4), (5, 6)] });
        assert!(request(&["input", "--socket", "s", "drag", "1", "2", "3", "4", "5"]).is_err());
        let (_, _, typed) = request(&["input", "--socket", "s", "type", "-x y"]).unwrap();
        assert_eq!(typed.action, Action::Type { text: "-x y".into() });
    }

    #[test]
    fn screenshot_needs_one_source_and_takes_its_format_from_the_file_name() {
        assert!(parse(&["screenshot", "-o", "a.png"]).is_err());
        assert!(parse(&["screenshot", "--socket", "s", "--snapshot", "d", "-o", "a.png"]).is_err());
        let Command::Screenshot(shot) =
            parse(&["screenshot", "--socket", "s", "-o", "a.raw", "--crop", "1,2,3,4", "--still", "200"])
                .unwrap()
                .command
        else {
            panic!("not screenshot")
        };
        let (_, _, request) = shot.request();
        assert_eq!(
            (request.format, request.crop, request.wait),
            (ImageFormat::Raw, Some([1, 2, 3, 4]), Wait::StillFor(200))
        );
        assert_eq!(request.timeout_ms, 10_000);
    }

    #[test]
    fn disk_create_takes_size_or_base() {
        assert!(parse(&["disk", "create", "l", "--size", "8M"]).is_ok());
        assert!(parse(&["disk", "create", "l", "--base", "b.raw"]).is_ok());
        assert!(parse(&["disk", "create", "l"]).is_err());
        assert!(parse(&["disk", "create", "l", "--size", "8M", "--base", "b.raw"]).is_err());
    }
}
