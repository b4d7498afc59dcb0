//! carrel-vmm: the virtual machine monitor that runs one agent VM per process.
//!
//! The VM is wired in [`builder`], run by [`vmm`]; KVM state lives in [`vstate`], the
//! hardware-vs-PVM differences in [`platform`], devices in [`devices`], kernel loading in
//! [`boot`], and the VM's own control socket in [`control`].

pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod disk;
pub mod input;
pub mod jail;
pub mod memory;
pub mod platform;
pub mod recorder;
pub mod sched;
pub mod seccomp;
pub mod services;
pub mod snapshot;
pub mod sockets;
pub mod timeline;
pub mod vmm;
pub mod vstate;
