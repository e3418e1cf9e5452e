"""The system-call filter of every sandbox, as the raw BPF bubblewrap's ``--seccomp`` loads.

A deny-list, compiled with libseccomp (``libseccomp.so.2``, a dependency of bubblewrap
itself) through ctypes. It takes away kernel surface no map, reduce or TF task needs,
as a second layer behind what the namespaces and the dropped capabilities already
refuse: tracing and reading other processes, the key rings, BPF and perf, io_uring,
userfaultfd, mounts and namespaces (nested user namespaces above all), module and
kexec loading, terminal injection. Two more are denied because their kernel counters
are charged to the *outside* uid, which for a non-root agent is the agent's own: a
sandbox holding many inotify instances or POSIX message queues would starve the agent.
``clone3`` answers ENOSYS, so that libc falls back to ``clone``, whose flags (unlike
``clone3``'s, behind a pointer) the filter can check for CLONE_NEWUSER. System calls of
other ABIs (i386, x32) kill the process.
"""

from __future__ import annotations

import ctypes
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
CLONE_NEWUSER = 0x10000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

#: Denied with EPERM.
DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at", "personality", "acct", "swapon", "swapoff", "reboot",
    "syslog", "fanotify_init", "lookup_dcookie", "quotactl", "vhangup", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "nfsservctl", "uselib", "_sysctl",
    "inotify_init", "inotify_init1", "mq_open", "memfd_secret",
)


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def compile_filter() -> bytes:
    """The BPF program (x86-64). Raises OSError when libseccomp is missing or refuses."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        def rule(name: str, action: int, *compare: tuple[int, int, int]) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a system call of this kernel's ABI
                return
            args = (_ArgCmp * max(len(compare), 1))(
                *[_ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, value) for arg, mask, value in compare])
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(compare), args if compare else None)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}")

        for name in DENY:
            rule(name, _errno_action(errno.EPERM))
        rule("clone3", _errno_action(errno.ENOSYS))
        rule("clone", _errno_action(errno.EPERM), (0, CLONE_NEWUSER, CLONE_NEWUSER))
        rule("ioctl", _errno_action(errno.EPERM), (1, 0xFFFFFFFF, TIOCSTI))
        rule("ioctl", _errno_action(errno.EPERM), (1, 0xFFFFFFFF, TIOCLINUX))
        fd = os.memfd_create("ipdc-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, "seccomp_export_bpf")
            size = os.fstat(fd).st_size
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
