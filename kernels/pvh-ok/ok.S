/*
 * pvh-ok: the smallest PVH guest. Prints "OK\n" on COM1, asks the i8042 for a reset
 * (Carrel's VMM treats that as poweroff and exits 0), then halts forever. Assembled
 * with IDLE defined (pvh-idle.elf) it skips the reset: a guest that stays, halted.
 *
 * PVH boot ABI (x86/HVM direct boot, as QEMU, Cloud Hypervisor, Firecracker and
 * Carrel implement it): the loader finds the 32-bit physical entry in the ELF note
 * XEN_ELFNOTE_PHYS32_ENTRY (type 18, name "Xen") and starts the vCPU there in 32-bit
 * protected mode, flat 4 GiB CS/DS, paging off, interrupts off, ebx = physical address
 * of struct hvm_start_info. We use none of it: no stack, no memory writes.
 */

        .set XEN_ELFNOTE_PHYS32_ENTRY, 18
        .set COM1,          0x3f8
        .set I8042_COMMAND, 0x64
        .set I8042_RESET,   0xfe       /* pulse the reset line */

/* The PVH note. The descriptor is 8 bytes, like Linux's own note on x86-64: loaders
 * that read a u32 (rust-vmm linux-loader) and those that read a u64 (QEMU, for ELF64)
 * both get the entry address. */
        .section .note.Xen, "a", @note
        .balign 4
        .long   2f - 1f                 /* namesz */
        .long   4f - 3f                 /* descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
1:      .asciz  "Xen"
2:      .balign 4
3:      .quad   pvh_start
4:      .balign 4

        .text
        .code32
        .globl  pvh_start
        .type   pvh_start, @function
pvh_start:
        movw    $COM1, %dx
        movb    $'O', %al
        outb    %al, %dx
        movb    $'K', %al
        outb    %al, %dx
        movb    $'\n', %al
        outb    %al, %dx

.ifndef IDLE                            /* pvh-idle.elf stays: a guest to snapshot */
        movb    $I8042_RESET, %al
        outb    %al, $I8042_COMMAND
.endif

1:      cli                             /* no i8042 (QEMU microvm): stay halted */
        hlt
        jmp     1b
        .size   pvh_start, . - pvh_start
