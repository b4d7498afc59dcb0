//! All KVM vm and vcpu ioctls: the VM (memory slots, irqchip, irqfd/ioeventfd), the vCPU
//! threads and their state machine, and the register state a guest is entered with.

pub mod regs;
pub mod vcpu;
pub mod vm;
