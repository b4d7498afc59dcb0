//! Time and wake-ups: the kernel's uptime, read from the TSC, and the LAPIC timer that
//! wakes the main loop.
//!
//! Uptime never comes from counting timer interrupts: a tickless kernel takes none while
//! idle, and a busy host may deliver a periodic one late. It is the TSC since the timer
//! started, at BootInfo's rate. A restore moves the TSC (it is the host's and cannot be
//! written back), so after one the uptime goes on from the last value seen before it.
//!
//! By default the timer is tickless: a one-shot count to the next deadline the kernel
//! has (the clock's next second, the agent's next heartbeat or finished sleep), and no
//! count at all when nothing is due; devices wake the kernel through their interrupts.
//! `desk.tick=periodic` keeps the old 1 kHz periodic timer instead, so one kernel binary
//! can be measured both ways.

use core::sync::atomic::Ordering;

use crate::interrupts::TICKS;
use crate::{lapic, rdtsc};

/// Rate of the periodic timer (`desk.tick=periodic` and `desk.exit=1`).
pub const PERIODIC_HZ: u32 = 1000;

/// Wake a little after a deadline rather than a little before: the APIC timer and the
/// TSC are separate clocks, and a wake just short of the deadline would find nothing due
/// and cost a second wake.
const WAKE_LATE_NANOSECONDS: u64 = 50_000;

/// The earlier of two deadlines, either of which may be absent.
pub fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How the LAPIC timer wakes the kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// A one-shot count to the next deadline only.
    Tickless,
    /// An interrupt every millisecond, deadline or not.
    Periodic,
}

impl TimerMode {
    /// `desk.tick=periodic` on the command line asks for the periodic timer.
    pub fn from_cmdline(cmdline: &str) -> TimerMode {
        if cmdline.split(' ').any(|argument| argument == "desk.tick=periodic") {
            TimerMode::Periodic
        } else {
            TimerMode::Tickless
        }
    }
}

/// Uptime in milliseconds from the TSC.
pub struct Clock {
    tsc_khz: u64,
    /// TSC when the uptime was `origin_ms`.
    origin_tsc: u64,
    origin_ms: u64,
}

impl Clock {
    /// A clock at uptime 0 now; `tsc_khz` is TSC cycles per millisecond (not 0).
    pub fn start(tsc_khz: u64) -> Clock {
        Clock { tsc_khz: tsc_khz.max(1), origin_tsc: rdtsc(), origin_ms: 0 }
    }

    pub fn now_ms(&self) -> u64 {
        self.origin_ms + rdtsc().saturating_sub(self.origin_tsc) / self.tsc_khz
    }

    /// Goes on from `uptime_ms` now: after a restore the TSC has moved by however long
    /// the snapshot lay on disk, or gone back on another host, and neither is uptime.
    pub fn resume_at(&mut self, uptime_ms: u64) {
        self.origin_tsc = rdtsc();
        self.origin_ms = uptime_ms;
    }

    /// Nanoseconds from now until uptime `deadline_ms` (0 when it has passed).
    fn nanoseconds_until(&self, deadline_ms: u64) -> u64 {
        let deadline_tsc = self.origin_tsc + deadline_ms.saturating_sub(self.origin_ms) * self.tsc_khz;
        let cycles = deadline_tsc.saturating_sub(rdtsc());
        // Capped first, so the product below cannot overflow for any TSC rate.
        let cycles = cycles.min(lapic::MAX_ONE_SHOT_NANOSECONDS / 1_000_000 * self.tsc_khz);
        (cycles * 1_000_000).div_ceil(self.tsc_khz)
    }
}

/// The LAPIC timer in the chosen mode.
pub struct Timer {
    mode: TimerMode,
    /// The deadline the one-shot count runs to, if one does.
    armed_ms: Option<u64>,
    /// [`TICKS`] when that count was armed: once it differs, the count has run out.
    armed_at_tick: u64,
}

impl Timer {
    /// Starts the timer on `vector` in `mode`. A tickless timer waits for [`Timer::wake_at`].
    pub fn start(mode: TimerMode, vector: u8) -> Timer {
        match mode {
            TimerMode::Tickless => lapic::start_one_shot_timer(vector),
            TimerMode::Periodic => lapic::start_periodic_timer(vector, PERIODIC_HZ),
        }
        Timer { mode, armed_ms: None, armed_at_tick: 0 }
    }

    /// Forgets the count it armed: after a restore the kernel arms afresh rather than
    /// trust a count the VMM carried over.
    pub fn forget_armed(&mut self) {
        self.armed_ms = None;
    }

    /// What the boot log says about the timer.
    pub fn describe(&self) -> &'static str {
        match self.mode {
            TimerMode::Tickless => "tickless",
            TimerMode::Periodic => "1000 Hz periodic",
        }
    }

    /// Makes sure an interrupt comes within `nanoseconds`: a bound on a sleep that waits
    /// for a device. The deadline [`Timer::wake_at`] armed is forgotten, so its next call
    /// arms it again.
    pub fn wake_within(&mut self, nanoseconds: u64) {
        if self.mode == TimerMode::Periodic {
            return;
        }
        lapic::arm_one_shot(nanoseconds);
        self.armed_ms = None;
    }

    /// Makes sure the kernel wakes at uptime `deadline_ms`, or only for a device when
    /// `None`. The periodic timer wakes it every millisecond anyway. A count already
    /// running to the same deadline is left alone: a device interrupt in between (a key,
    /// a vsock packet) costs no APIC write.
    ///
    /// Whether the count still runs is known from its interrupt, never from the clock:
    /// the APIC timer and the TSC are separate clocks, and where the TSC lags (a nested
    /// hypervisor whose host marked its TSC unstable catches a halted vCPU's TSC up only
    /// when it next runs) the count runs out before the clock reaches the deadline. A
    /// count judged by the clock would then look still running, be left alone, and leave
    /// the kernel with no timer at all.
    pub fn wake_at(&mut self, clock: &Clock, deadline_ms: Option<u64>) {
        if self.mode == TimerMode::Periodic {
            return;
        }
        let still_running = self.armed_ms.is_some() && TICKS.load(Ordering::Relaxed) == self.armed_at_tick;
        if still_running && self.armed_ms == deadline_ms {
            return;
        }
        match deadline_ms {
            Some(deadline) => {
                self.armed_at_tick = TICKS.load(Ordering::Relaxed);
                lapic::arm_one_shot(clock.nanoseconds_until(deadline) + WAKE_LATE_NANOSECONDS);
            }
            None if still_running => lapic::disarm_one_shot(),
            None => {}
        }
        self.armed_ms = deadline_ms;
    }
}
