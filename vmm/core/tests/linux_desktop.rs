//! The Linux agent image (kernels/linux/build-image.sh) on carrel-vmm: Debian's generic
//! kernel finds every Carrel device through ACPI, the guest agent answers over vsock, Xorg
//! shows a terminal and its cursor, a click and typed text land in the terminal, Firefox
//! shows a page, the rng yields bytes, and the guest powers the VM off.
//!
//! These need hardware KVM (a stock Linux cannot reach userspace on kvm_pvm) and the image,
//! so they are ignored by default; scripts/nested-test.sh runs them with `--ignored` in its
//! nested machine. The image is found in `CARREL_LINUX_IMAGE` (a directory), by default
//! `target/guests/linux-desktop`. A boot costs minutes in an emulated machine, so one test
//! walks the whole session in order, each step waiting on the guest (a console line, the
//! agent, a frame), never on a sleep. Screenshots are saved as PNGs in
//! `CARREL_ARTIFACTS_DIR`, by default `target/linux-desktop`, for people to look at.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use carrel_agent_client::{connect_vsock_uds, Client, ExecRequest, OutputStream};
use carrel_vmm::control::{ControlClient, ImageFormat, InputRequest, Request, Response, ScreenshotRequest, Wait};
use carrel_vmm::input::{Action, Button};
use common::{scaled, scratch_path, workspace_root, RunningVm};

const IMAGE_ENV: &str = "CARREL_LINUX_IMAGE";
const ARTIFACTS_ENV: &str = "CARREL_ARTIFACTS_DIR";
/// Deadlines on hardware KVM; `scaled` stretches them in an emulated machine.
const AGENT_DEADLINE: Duration = Duration::from_secs(120);
const DESKTOP_DEADLINE: Duration = Duration::from_secs(180);
const STEP_DEADLINE: Duration = Duration::from_secs(60);
const POWER_OFF_DEADLINE: Duration = Duration::from_secs(60);
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// vCPUs: `CARREL_LINUX_CPUS` (scripts/nested-test.sh passes it on), by default one. In
/// the nested machine (QEMU 7.2 TCG, emulated SVM) the L1 kernel once died of a stack
/// overflow in a carrel-vmm vCPU thread ("stack guard page was hit", GS base 0) about a
/// minute into booting this image with two; three later runs with two passed.
fn cpus() -> u32 {
    std::env::var("CARREL_LINUX_CPUS").ok().and_then(|value| value.parse().ok()).filter(|&cpus| cpus >= 1).unwrap_or(1)
}
const MEM_MIB: u32 = 1024;
/// The colours kernels/linux/image/rootfs/etc/carrel/desktop gives the root window and
/// the terminal's background.
const DESKTOP_BACKGROUND: [u8; 3] = [0x35, 0x62, 0x7e];
const TERMINAL_BACKGROUND: [u8; 3] = [0xfd, 0xf6, 0xe3];
/// The background of the page the test opens in Firefox, and how long Firefox may take.
const PAGE_BACKGROUND: [u8; 3] = [0xc8, 0x3e, 0x4d];
const FIREFOX_DEADLINE: Duration = Duration::from_secs(90);

/// The built image's files.
struct Image {
    vmlinux: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    cmdline: String,
    version: String,
}

impl Image {
    /// The image in `CARREL_LINUX_IMAGE` or target/guests/linux-desktop; panics saying how
    /// to build it when a file is missing.
    fn find() -> Image {
        let dir = std::env::var_os(IMAGE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/guests/linux-desktop"));
        let file = |name: &str| {
            let path = dir.join(name);
            assert!(
                path.is_file(),
                "the Linux image is incomplete: {} is missing. Build it with \
                 `sudo kernels/linux/build-image.sh {}`, or point {IMAGE_ENV} at a built image",
                path.display(),
                dir.display()
            );
            path
        };
        let read = |name: &str| std::fs::read_to_string(file(name)).unwrap().trim().to_string();
        Image {
            vmlinux: file("vmlinux"),
            initrd: file("initrd.img"),
            rootfs: file("rootfs.ext4"),
            cmdline: read("cmdline"),
            version: read("version"),
        }
    }
}

/// A booted image: the VMM, its control socket and its vsock socket.
struct LinuxVm {
    vm: RunningVm,
    control: PathBuf,
    vsock: PathBuf,
    layer: PathBuf,
}

impl LinuxVm {
    /// Boots the image with its root disk as a fresh layer over the read-only rootfs, so
    /// the image stays as built.
    fn boot(image: &Image) -> LinuxVm {
        let (control, vsock, layer) =
            (scratch_path("linux.sock"), scratch_path("linux.vsock"), scratch_path("root.layer"));
        let disk = format!("{},base={}", layer.display(), image.rootfs.display());
        let display = format!("{WIDTH}x{HEIGHT}");
        let vm = RunningVm::start(&[
            "run",
            "--kernel",
            image.vmlinux.to_str().unwrap(),
            "--initrd",
            image.initrd.to_str().unwrap(),
            "--cmdline",
            &image.cmdline,
            "--mem",
            &MEM_MIB.to_string(),
            "--cpus",
            &cpus().to_string(),
            "--display",
            &display,
            "--disk",
            &disk,
            "--socket",
            control.to_str().unwrap(),
            "--vsock",
            vsock.to_str().unwrap(),
        ]);
        LinuxVm { vm, control, vsock, layer }
    }

    fn agent(&self) -> Client<UnixStream> {
        // Seen once in the nested machine: the first connection right after the agent
        // said it serves was refused by the guest (an empty handshake reply). A client
        // tries again, as carreld and scripts/nested/linux-agent.sh do; each refusal is
        // said.
        let deadline = Instant::now() + scaled(STEP_DEADLINE);
        let stream = loop {
            match connect_vsock_uds(&self.vsock, carrel_agent_proto::AGENT_VSOCK_PORT) {
                Ok(stream) => break stream,
                Err(err @ carrel_agent_client::ConnectError::AcceptHandshake { .. }) if Instant::now() < deadline => {
                    eprintln!("linux desktop: the agent's port refused a connection ({err:?}); trying again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(err) => panic!("cannot connect to the agent: {err:?}"),
            }
        };
        stream.set_read_timeout(Some(scaled(STEP_DEADLINE))).unwrap();
        let mut client = Client::new(stream);
        client.wait_ready(scaled(STEP_DEADLINE)).unwrap();
        client
    }

    fn screenshot(&self, wait: Wait) -> Screen {
        self.screenshot_with(wait, false)
    }

    /// A screenshot, with the guest's cursor drawn in when `cursor`.
    fn screenshot_with(&self, wait: Wait, cursor: bool) -> Screen {
        let request = ScreenshotRequest {
            format: ImageFormat::Png,
            crop: None,
            scale: None,
            cursor,
            wait,
            timeout_ms: scaled(STEP_DEADLINE).as_millis() as u64,
        };
        let response = ControlClient::connect(&self.control)
            .unwrap()
            .call(&Request::Screenshot(request), scaled(STEP_DEADLINE) * 2)
            .unwrap();
        match response {
            Response::Screenshot(shot) => Screen::decode(&shot.bytes),
            other => panic!("expected a screenshot, got {other:?}"),
        }
    }

    /// Waits for a console line with `needle`, which may have come already.
    fn wait_for_line(&mut self, needle: &str, deadline: Duration) -> String {
        match self.vm.output.iter().find(|line| line.contains(needle)) {
            Some(line) => line.clone(),
            None => self.vm.wait_for_line(needle, deadline),
        }
    }

    /// Does `action`; with `wait`, returns once the guest has drawn a frame after it
    /// (pointer moves and a click that changes nothing draw none: the cursor is a plane).
    fn act(&self, action: Action, wait: Option<Wait>) {
        let request = InputRequest {
            action,
            wait,
            screenshot: None,
            timeout_ms: scaled(STEP_DEADLINE).as_millis() as u64,
            hold_ms: None,
            gap_ms: None,
        };
        let response = ControlClient::connect(&self.control)
            .unwrap()
            .call(&Request::Input(request), scaled(STEP_DEADLINE))
            .unwrap();
        match response {
            Response::Input(result) => assert!(!result.timed_out, "the guest drew nothing after the action"),
            other => panic!("expected an input result, got {other:?}"),
        }
    }
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = self.vm.child.kill();
        for path in [&self.control, &self.vsock, &self.layer] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs `sh -c script` in the guest; returns (exit code, stdout, stderr).
fn shell(agent: &mut Client<UnixStream>, script: &str) -> (Option<i32>, String, String) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = agent
        .exec(ExecRequest::shell(script).timeout(scaled(STEP_DEADLINE)), |stream, bytes| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(bytes),
            OutputStream::Stderr => stderr.extend_from_slice(bytes),
        })
        .unwrap();
    (status.code, String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

/// `sh -c script` that must succeed; returns its stdout.
fn shell_ok(agent: &mut Client<UnixStream>, script: &str) -> String {
    let (code, stdout, stderr) = shell(agent, script);
    assert_eq!(code, Some(0), "`{script}` failed: stdout {stdout:?}, stderr {stderr:?}");
    stdout
}

/// An RGB screenshot.
struct Screen {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    png: Vec<u8>,
}

impl Screen {
    fn decode(png: &[u8]) -> Screen {
        let (width, height, pixels) = common::decode_png(png);
        Screen { width, height, pixels, png: png.to_vec() }
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let offset = ((y * self.width + x) * 3) as usize;
        [self.pixels[offset], self.pixels[offset + 1], self.pixels[offset + 2]]
    }

    /// The bounding box [x, y, width, height] of the pixels of `colour`, if any.
    fn bounds_of(&self, colour: [u8; 3]) -> Option<[u32; 4]> {
        let (mut left, mut top, mut right, mut bottom) = (u32::MAX, u32::MAX, 0, 0);
        for y in 0..self.height {
            for x in 0..self.width {
                if self.pixel(x, y) == colour {
                    (left, top, right, bottom) = (left.min(x), top.min(y), right.max(x), bottom.max(y));
                }
            }
        }
        (left != u32::MAX).then(|| [left, top, right - left + 1, bottom - top + 1])
    }

    fn colours_in(&self, [x, y, width, height]: [u32; 4]) -> usize {
        (y..y + height)
            .flat_map(|row| (x..x + width).map(move |column| (column, row)))
            .map(|(column, row)| self.pixel(column, row))
            .collect::<HashSet<_>>()
            .len()
    }

    /// Saves the PNG as `name` in the artifacts directory (or the temp dir when that is
    /// read-only, as in the nested machine) and says where.
    fn save(&self, name: &str) {
        let preferred = std::env::var_os(ARTIFACTS_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/linux-desktop"));
        for dir in [preferred, std::env::temp_dir().join("carrel-linux-desktop")] {
            let path = dir.join(name);
            if std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &self.png)).is_ok() {
                eprintln!("linux desktop: saved {}", path.display());
                return;
            }
        }
        eprintln!("linux desktop: could not save {name}");
    }
}

/// The Carrel devices a guest must see, as (virtio device id, Linux driver) and how many.
fn expected_devices() -> BTreeMap<(String, String), usize> {
    [
        ("0x0002", "virtio_blk", 1),
        ("0x0004", "virtio_rng", 1),
        ("0x0010", "virtio_gpu", 1),
        ("0x0012", "virtio_input", 2),
        ("0x0013", "vmw_vsock_virtio_transport", 1),
    ]
    .into_iter()
    .map(|(id, driver, count)| ((id.to_string(), driver.to_string()), count))
    .collect()
}

#[test]
#[ignore = "needs hardware KVM and the Linux image: run by scripts/nested-test.sh"]
fn linux_desktop_boots_with_acpi_devices_agent_xorg_input_rng_and_powers_off() {
    let image = Image::find();
    let started = Instant::now();
    let mut linux = LinuxVm::boot(&image);

    // The agent: started by init as soon as the vsock driver is loaded.
    linux.wait_for_line("carrel-guest-agent: serving", scaled(AGENT_DEADLINE));
    eprintln!("linux desktop: the agent serves {:?} after the VMM started", started.elapsed());
    let mut agent = linux.agent();
    let hello = agent.hello().unwrap();
    assert!(hello.name.starts_with("carrel-guest-agent"), "{hello:?}");
    agent.ping().unwrap();
    assert_eq!(shell_ok(&mut agent, "uname -r").trim(), image.version, "the generic kernel the image was built for");
    eprintln!("linux desktop: agent {} on {}; ping and exec answer", hello.name, hello.os);

    // ACPI: the virtio-mmio transports are LNRO0005 devices, every device is bound to its
    // driver, and the MADT gives Linux every vCPU.
    let listing = shell_ok(
        &mut agent,
        "for d in /sys/bus/virtio/devices/*; do \
             printf '%s %s %s\\n' \"$(cat $d/device)\" \"$(basename \"$(readlink $d/driver)\")\" \
                 \"$(basename \"$(dirname \"$(readlink -f $d)\")\")\"; \
         done",
    );
    eprintln!("linux desktop: /sys/bus/virtio/devices (id, driver, parent):\n{listing}");
    let mut found: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "a device without a driver: {line:?}");
        assert!(fields[2].starts_with("LNRO0005:"), "a device not found through ACPI: {line:?}");
        *found.entry((fields[0].to_string(), fields[1].to_string())).or_default() += 1;
    }
    assert_eq!(found, expected_devices(), "the bound devices");
    assert_eq!(shell_ok(&mut agent, "nproc").trim(), cpus().to_string(), "every vCPU from the MADT");
    // The disk: `--disk` is /dev/vda, the root filesystem, written through the layer.
    let mounts = shell_ok(&mut agent, "cat /proc/mounts");
    assert!(
        mounts.lines().any(|line| line.starts_with("/dev/vda / ext4 rw")),
        "the root is /dev/vda, ext4, read-write:\n{mounts}"
    );
    let written = shell_ok(&mut agent, "echo carrel-disk > /root/on-vda && sync && cat /root/on-vda");
    assert_eq!(written.trim(), "carrel-disk");

    // The desktop: Xorg at the display's size, openbox, a terminal.
    let ready = linux.wait_for_line("carrel-desktop: ready", scaled(DESKTOP_DEADLINE));
    eprintln!("linux desktop: {ready:?} {:?} after the VMM started", started.elapsed());
    let size = shell_ok(&mut agent, "xdotool getdisplaygeometry");
    assert_eq!(size.trim(), format!("{WIDTH} {HEIGHT}"), "Xorg's screen is the display's size");
    let desktop = linux.screenshot(Wait::StillFor(1_000));
    desktop.save("desktop.png");
    assert_eq!((desktop.width, desktop.height), (WIDTH, HEIGHT));
    assert_eq!(desktop.pixel(WIDTH - 2, HEIGHT - 2), DESKTOP_BACKGROUND, "the root window's colour in a corner");
    let terminal = desktop.bounds_of(TERMINAL_BACKGROUND).expect("the terminal's background is on screen");
    assert!(terminal[2] >= 400 && terminal[3] >= 200, "the terminal is a window, not a few pixels: {terminal:?}");
    let colours = desktop.colours_in(terminal);
    assert!(colours >= 8, "the terminal shows text (a prompt): {colours} colours in {terminal:?}");
    eprintln!("linux desktop: terminal at {terminal:?} with {colours} colours");

    // The tablet: the pointer lands where the host put it.
    let (x, y) = (terminal[0] + terminal[2] / 2, terminal[1] + terminal[3] / 2);
    linux.act(Action::Move { x, y }, None);
    // The guest takes the event in its own time: it asks X until the pointer is there.
    let location = shell_ok(
        &mut agent,
        &format!(
            "for i in $(seq 300); do eval $(xdotool getmouselocation --shell); \
                 [ $((X - {x})) -ge -1 ] && [ $((X - {x})) -le 1 ] && \
                 [ $((Y - {y})) -ge -1 ] && [ $((Y - {y})) -le 1 ] && break; sleep 0.1; \
             done; echo $X $Y"
        ),
    );
    let seen: Vec<i64> = location.split_whitespace().filter_map(|value| value.parse().ok()).collect();
    assert!(
        seen.len() == 2 && (seen[0] - i64::from(x)).abs() <= 1 && (seen[1] - i64::from(y)).abs() <= 1,
        "the pointer is at {location:?}, the host moved it to ({x}, {y})"
    );
    // The cursor: Xorg puts it on virtio-gpu's cursor plane, so it is not in the scanout's
    // pixels but in a screenshot that asks for it, at the pointer.
    let bare = linux.screenshot(Wait::StillFor(500));
    let pointed = linux.screenshot_with(Wait::FirstFrame, true);
    pointed.save("cursor.png");
    let changed = common::differences(&bare.pixels, &pointed.pixels, WIDTH);
    let around = [x.saturating_sub(16), y.saturating_sub(16), 80, 80];
    let near = changed.iter().filter(|(px, py)| common::inside(around, *px, *py)).count();
    assert!(
        near >= 20,
        "the cursor is drawn at the pointer: {near} of {} changed pixels near ({x}, {y})",
        changed.len()
    );
    // Its shape, not its 64x64 buffer: the transparent pixels show the screen (Linux's
    // cursor buffer is B8G8R8X8, its fourth byte alpha all the same).
    assert!(near <= 1024, "the cursor covers {near} pixels near ({x}, {y}): its transparent part was drawn");

    // A click in the terminal and typed text: the shell in it runs the command.
    linux.act(Action::Click { x, y, button: Button::Left, count: 1 }, None);
    linux.act(Action::Type { text: "echo carrel-typed > /tmp/t\n".into() }, Some(Wait::FrameAfter(0)));
    let typed = shell_ok(&mut agent, "for i in $(seq 600); do [ -s /tmp/t ] && break; sleep 0.1; done; cat /tmp/t");
    assert_eq!(typed, "carrel-typed\n", "the typed command ran in the terminal");
    let after = linux.screenshot(Wait::StillFor(1_000));
    after.save("desktop-typed.png");
    let changed = common::differences(&desktop.pixels, &after.pixels, WIDTH);
    let inside = changed.iter().filter(|(x, y)| common::inside(terminal, *x, *y)).count();
    assert!(inside >= 100, "the typed line shows in the terminal: {inside} of {} changed pixels inside", changed.len());

    // The browser: Firefox ESR shows a page, full screen (kiosk: no first-run tabs).
    let firefox = shell_ok(&mut agent, "firefox-esr --version");
    assert!(firefox.contains("Mozilla Firefox"), "{firefox}");
    shell_ok(
        &mut agent,
        &format!(
            "printf '<html><body style=\"background:#{:02x}{:02x}{:02x}\"><h1>carrel</h1></body></html>' \
                 > /tmp/carrel.html && \
             setsid firefox-esr --kiosk file:///tmp/carrel.html </dev/null >/tmp/firefox.log 2>&1 &",
            PAGE_BACKGROUND[0], PAGE_BACKGROUND[1], PAGE_BACKGROUND[2]
        ),
    );
    let browsing = Instant::now();
    let page = loop {
        let shot = linux.screenshot(Wait::StillFor(500));
        match shot.bounds_of(PAGE_BACKGROUND) {
            Some(page) if page[2] >= WIDTH / 2 && page[3] >= HEIGHT / 2 => break shot,
            _ if browsing.elapsed() < scaled(FIREFOX_DEADLINE) => {}
            _ => {
                shot.save("firefox-missing.png");
                let log = shell(&mut agent, "tail -20 /tmp/firefox.log").1;
                panic!("no Firefox page on screen after {:?}; its log:\n{log}", browsing.elapsed());
            }
        }
    };
    page.save("firefox.png");
    let window = shell_ok(&mut agent, "xdotool search --onlyvisible --class firefox | head -1");
    assert!(!window.trim().is_empty(), "the page is in a Firefox window");
    eprintln!("linux desktop: Firefox shows the page {:?} after it was started", browsing.elapsed());
    // By its process name: `pkill -f` would match this shell's own command line.
    shell_ok(&mut agent, "pkill -x firefox-esr; true");

    // The rng: /dev/hwrng is virtio-rng and yields bytes.
    assert_eq!(shell_ok(&mut agent, "cat /sys/class/misc/hw_random/rng_current").trim(), "virtio_rng.0");
    let random = shell_ok(&mut agent, "head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \\n'");
    assert_eq!(random.len(), 128, "64 bytes from /dev/hwrng: {random}");
    assert_ne!(random, "0".repeat(128), "random bytes are not all zero");

    // Power-off: init stops everything and leaves the root clean; ACPI ends the VM with 0.
    agent.start_exec(ExecRequest::new(["poweroff"])).unwrap();
    let status = linux.vm.wait_for_exit(scaled(POWER_OFF_DEADLINE));
    assert_eq!(status.code(), Some(0), "carrel-vmm exits 0 when the guest powers off:\n{}", linux.vm.text());
    assert!(linux.vm.text().contains("carrel: shutting down"), "init ran its shutdown");
}
