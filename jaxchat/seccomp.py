"""The code sandbox's system-call filter: the kernel refuses the calls that lead back out of the boundary.

Dropping to an unprivileged uid is not enough on its own: where the host allows unprivileged user namespaces, such a
process can make one (`unshare -Urm`), be uid 0 with every capability inside it, and mount a tmpfs of any size, past
every memory limit of the sandbox. Some kernel objects hold memory that no rlimit counts either (a memfd, a System V
shared-memory segment after it is detached). bubblewrap installs this filter (`--seccomp FD`, with no_new_privs) just
before it starts the interpreter, so it binds the code and every process it starts; what it names fails with EPERM.

The filter is classic BPF over `struct seccomp_data` (nr at offset 0, arch at 4, args from 16), written out here
because the standard library has no seccomp binding. System-call numbers differ per architecture; the filter knows
x86_64 and aarch64, and a call made through another ABI (32-bit x86 from a 64-bit process, x32) kills the process.
"""
import errno
import platform
import struct

# name: (x86_64 number, aarch64 number)
BLOCKED = {
    # namespaces: a new user namespace gives back every capability; clone is checked by its flags below
    "unshare": (272, 97), "setns": (308, 268),
    # mounts, with the old and the new mount API
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442),
    # memory that no rlimit of the sandbox counts
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
    "mq_open": (240, 180), "io_uring_setup": (425, 425),
    # kernel interfaces no program in the sandbox needs, each a known way to attack the kernel or another process
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "open_by_handle_at": (304, 265),
}
CLONE = (56, 220)
CLONE3 = (435, 435)  # its flags live in memory the filter cannot read: ENOSYS makes libc fall back to clone
CLONE_NEW_NAMESPACES = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
X32_SYSCALL_BIT = 0x40000000
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column in the tables, AUDIT_ARCH_*

LOAD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000


def fail(code):
    return 0x00050000 | code  # SECCOMP_RET_ERRNO: the call returns -1 with this errno


def filter_program(machine=None):
    """The filter as bytes, ready for bubblewrap's --seccomp; None on an architecture it does not know."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return None
    column, audit_arch = ARCHES[machine]
    # Each instruction: (code, jump if true, jump if false, constant); jumps count instructions skipped.
    program = [(LOAD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, KILL_PROCESS), (LOAD, 0, 0, 0)]
    if machine == "x86_64":
        program += [(JSET, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, KILL_PROCESS)]
    for numbers in BLOCKED.values():
        program += [(JEQ, 0, 1, numbers[column]), (RET, 0, 0, fail(errno.EPERM))]
    program += [(JEQ, 0, 1, CLONE3[column]), (RET, 0, 0, fail(errno.ENOSYS)),
                (JEQ, 0, 3, CLONE[column]), (LOAD, 0, 0, 16),  # clone's flags: the low half of its first argument
                (JSET, 0, 1, CLONE_NEW_NAMESPACES), (RET, 0, 0, fail(errno.EPERM)),
                (RET, 0, 0, ALLOW)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
