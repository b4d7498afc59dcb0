//! All KVM vm and vcpu ioctls: the VM (memory slots, irqchip, irqfd/ioeventfd), the vCPU
//! threads and their state machine, the register state a guest is entered with, and the
//! saved KVM state of a snapshot.

pub mod persist;
pub mod regs;
pub mod vcpu;
pub mod vm;
