// mxc-vm guest kernel self-test, run as /init. Prints one line per check:
// "ok <name>" or "FAIL <name>: detail", then "ALL OK" / "SOME FAILED" and reboots
// (reboot(RB_AUTOBOOT), which with reboot=k goes out through port 0x64).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures;
static char buf[512];

static void say(const char *s) { (void)!write(1, s, strlen(s)); }
static void ok(const char *name) { snprintf(buf, sizeof buf, "ok %s\n", name); say(buf); }
static void fail(const char *name, const char *why) {
	failures++;
	snprintf(buf, sizeof buf, "FAIL %s: %s (errno %d)\n", name, why, errno);
	say(buf);
}
#define CHECK(name, cond, why) do { if (cond) ok(name); else fail(name, why); } while (0)

static double now(clockid_t c) {
	struct timespec ts;
	clock_gettime(c, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

// Raw SYSCALL, returning rax and what came back in rcx/r11.
static long raw_syscall0(long nr, unsigned long *rcx, unsigned long *r11, unsigned long *ret_addr) {
	long ret;
	unsigned long c, ra;
	register unsigned long f __asm__("r11");
	__asm__ volatile(
		"lea 1f(%%rip), %[ra]\n\t"
		"pushfq\n\t"
		"orq $0x1, (%%rsp)\n\t" // set CF so we can see R11 carries user flags
		"popfq\n\t"
		"syscall\n\t"
		"1:\n\t"
		: "=a"(ret), "=c"(c), "=r"(f), [ra] "=&r"(ra)
		: "a"(nr)
		: "memory", "cc");
	*rcx = c; *r11 = f; *ret_addr = ra;
	return ret;
}

static volatile sig_atomic_t got_usr1, got_alrm;
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_alrm(int s) { (void)s; got_alrm++; }

static int child_main(void) {
	say("child: exec'd, exiting 42\n");
	return 42;
}

int main(int argc, char **argv) {
	if (argc > 1 && strcmp(argv[1], "child") == 0)
		return child_main();

	if (getpid() != 1) {
		say("testinit: not PID 1, refusing to run (it reboots the machine)\n");
		return 2;
	}
	double boot = now(CLOCK_BOOTTIME);
	snprintf(buf, sizeof buf, "READY /init at %.3f s after kernel start\n", boot);
	say(buf);

	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0)
		fail("mount-dev", "mount devtmpfs on /dev");
	if (mount("proc", "/proc", "proc", 0, NULL) == 0) {
		int fd = open("/proc/cmdline", O_RDONLY);
		char line[1024] = "cmdline: ";
		ssize_t n = fd >= 0 ? read(fd, line + 9, sizeof line - 10) : -1;
		if (n > 0) { line[9 + n] = 0; say(line); }
		if (fd >= 0) close(fd);
	}

	{
		// CPU time so far (USER_HZ ticks): user nice system idle iowait irq softirq steal.
		int fd = open("/proc/stat", O_RDONLY);
		char line[256] = "";
		ssize_t n = fd >= 0 ? read(fd, line, sizeof line - 1) : -1;
		if (fd >= 0) close(fd);
		if (n > 0) { line[n] = 0; char *nl = strchr(line, '\n'); if (nl) nl[1] = 0; say("stat: "); say(line); }
	}

	{
		char seed[16];
		long got = syscall(SYS_getrandom, seed, sizeof seed, 1 /* GRND_NONBLOCK */);
		say(got == (long)sizeof seed ? "crng: ready at /init\n" : "crng: not ready at /init (getrandom would block)\n");
	}

	CHECK("getpid", getpid() == 1, "pid is not 1");

	struct utsname u;
	if (uname(&u) == 0) { snprintf(buf, sizeof buf, "uname: %s %s %s\n", u.sysname, u.release, u.machine); say(buf); ok("uname"); }
	else fail("uname", "uname failed");

	unsigned long rcx, r11, ra;
	long r = raw_syscall0(99999, &rcx, &r11, &ra);
	CHECK("enosys", r == -ENOSYS, "invalid syscall did not give -ENOSYS");
	CHECK("rcx-after-syscall", rcx == ra, "RCX is not the return address");
	CHECK("r11-user-flags", (r11 & 0x1) && (r11 & 0x200) && !(r11 & 0x3000), "R11 lacks CF/IF or has IOPL");
	r = raw_syscall0(SYS_getpid, &rcx, &r11, &ra);
	CHECK("raw-getpid", r == 1, "raw getpid != 1");

	char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p != MAP_FAILED) { p[0] = 1; p[(1 << 20) - 1] = 2; CHECK("mmap", p[0] == 1 && p[(1 << 20) - 1] == 2 && munmap(p, 1 << 20) == 0, "mmap content"); }
	else fail("mmap", "mmap failed");

	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	kill(getpid(), SIGUSR1);
	CHECK("signal", got_usr1 == 1, "SIGUSR1 handler did not run");

	// Syscall restart: a read() on an empty pipe, interrupted by SIGALRM with SA_RESTART,
	// must be restarted (ip -= 2) and finish when the child writes.
	int pfd[2];
	if (pipe(pfd) != 0) fail("pipe", "pipe failed");
	struct sigaction sr = { .sa_handler = on_alrm, .sa_flags = SA_RESTART };
	sigaction(SIGALRM, &sr, NULL);
	pid_t w = fork();
	if (w == 0) {
		struct timespec d = { 0, 600 * 1000 * 1000 };
		nanosleep(&d, NULL);
		(void)!write(pfd[1], "x", 1);
		_exit(0);
	}
	struct itimerval it = { .it_value = { 0, 100 * 1000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	char c = 0;
	ssize_t n = read(pfd[0], &c, 1);
	int st = 0;
	waitpid(w, &st, 0);
	CHECK("pipe", n == 1 && c == 'x', "read from pipe");
	CHECK("restart-read", got_alrm == 1, "SIGALRM did not interrupt the read");

	// restart_syscall (ERESTART_RESTARTBLOCK): nanosleep interrupted by a handled signal.
	got_alrm = 0;
	setitimer(ITIMER_REAL, &it, NULL);
	struct timespec d = { 0, 400 * 1000 * 1000 }, rem = { 0, 0 };
	double t0 = now(CLOCK_MONOTONIC);
	int nr = nanosleep(&d, &rem);
	double slept = now(CLOCK_MONOTONIC) - t0;
	snprintf(buf, sizeof buf, "nanosleep: ret %d errno %d slept %.3f s alarms %d\n", nr, nr ? errno : 0, slept, got_alrm);
	say(buf);
	CHECK("nanosleep-eintr", nr == -1 && errno == EINTR && got_alrm == 1 && rem.tv_nsec > 0, "nanosleep not interrupted with EINTR");

	// restart_syscall (ERESTART_RESTARTBLOCK): a child's nanosleep stopped by SIGSTOP and
	// continued by SIGCONT resumes through restart_syscall and sleeps its full time.
	pid_t ch = fork();
	if (ch == 0) {
		struct timespec full = { 1, 0 };
		double start = now(CLOCK_MONOTONIC);
		int r3 = nanosleep(&full, NULL);
		_exit(r3 == 0 && now(CLOCK_MONOTONIC) - start >= 0.99 ? 0 : 1);
	}
	for (int tries = 0; tries < 500; tries++) {
		char path[64], stat[256] = "";
		snprintf(path, sizeof path, "/proc/%d/stat", ch);
		int sfd = open(path, O_RDONLY);
		ssize_t sn = sfd >= 0 ? read(sfd, stat, sizeof stat - 1) : -1;
		if (sfd >= 0) close(sfd);
		char *state = sn > 0 ? strrchr(stat, ')') : NULL;
		if (state && state[1] == ' ' && state[2] == 'S') break;
		struct timespec poll = { 0, 2 * 1000 * 1000 };
		nanosleep(&poll, NULL);
	}
	kill(ch, SIGSTOP);
	waitpid(ch, &st, WUNTRACED);
	kill(ch, SIGCONT);
	waitpid(ch, &st, 0);
	CHECK("restart-syscall", WIFEXITED(st) && WEXITSTATUS(st) == 0, "nanosleep did not resume after SIGSTOP/SIGCONT");

	// fork + exec + wait of a static binary.
	t0 = now(CLOCK_MONOTONIC);
	ch = fork();
	if (ch == 0) {
		char *av[] = { "/init", "child", NULL };
		char *ev[] = { NULL };
		execve("/init", av, ev);
		_exit(127);
	}
	st = 0;
	waitpid(ch, &st, 0);
	snprintf(buf, sizeof buf, "fork+exec+wait: %.3f s\n", now(CLOCK_MONOTONIC) - t0);
	say(buf);
	CHECK("fork-exec-wait", WIFEXITED(st) && WEXITSTATUS(st) == 42, "child did not exit 42");

	// ptrace: syscall-entry stop shows orig_rax = nr and rax = -ENOSYS.
	ch = fork();
	if (ch == 0) {
		ptrace(PTRACE_TRACEME, 0, NULL, NULL);
		raise(SIGSTOP);
		syscall(SYS_getppid);
		_exit(0);
	}
	waitpid(ch, &st, 0);
	ptrace(PTRACE_SYSCALL, ch, NULL, NULL);
	waitpid(ch, &st, 0);
	struct user_regs_struct regs;
	memset(&regs, 0, sizeof regs);
	ptrace(PTRACE_GETREGS, ch, NULL, &regs);
	CHECK("ptrace-entry-regs", WIFSTOPPED(st) && regs.orig_rax == SYS_getppid && (long)regs.rax == -ENOSYS, "orig_rax/rax at syscall entry");
	ptrace(PTRACE_SYSCALL, ch, NULL, NULL);
	waitpid(ch, &st, 0);
	ptrace(PTRACE_GETREGS, ch, NULL, &regs);
	CHECK("ptrace-exit-regs", WIFSTOPPED(st) && regs.orig_rax == SYS_getppid && (long)regs.rax == 1 && regs.rip == regs.rcx, "rax/rip at syscall exit");
	ptrace(PTRACE_CONT, ch, NULL, NULL);
	waitpid(ch, &st, 0);
	CHECK("ptrace-child-exit", WIFEXITED(st), "traced child did not exit");

	// seccomp filter: getppid() -> EPERM-like errno 123 in a child.
	ch = fork();
	if (ch == 0) {
		struct sock_filter f[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 123),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = { .len = 4, .filter = f };
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
			_exit(2);
		errno = 0;
		long r2 = syscall(SYS_getppid);
		_exit(r2 == -1 && errno == 123 ? 0 : 1);
	}
	waitpid(ch, &st, 0);
	CHECK("seccomp", WIFEXITED(st) && WEXITSTATUS(st) == 0, "seccomp filter did not apply");

	int vs = socket(AF_VSOCK, SOCK_STREAM, 0);
	CHECK("vsock-socket", vs >= 0, "socket(AF_VSOCK) failed");
	if (vs >= 0) close(vs);

	// Boot-timer marker through /dev/mem (MMIO 0xd0000000).
	int mfd = open("/dev/mem", O_RDWR | O_SYNC);
	if (mfd >= 0) {
		volatile uint32_t *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0xd0000000);
		if (m != MAP_FAILED) { m[0] = 0x1234; ok("devmem-mmio"); munmap((void *)m, 4096); }
		else fail("devmem-mmio", "mmap /dev/mem at 0xd0000000");
		close(mfd);
	} else fail("devmem-mmio", "open /dev/mem");

	if (access("/bin/busybox", X_OK) == 0) {
		ch = fork();
		if (ch == 0) {
			char *av[] = { "/bin/busybox", "sh", "-c", "echo busybox sh says hi; exit 7", NULL };
			char *ev[] = { "PATH=/bin:/sbin:/usr/bin:/usr/sbin", NULL };
			execve(av[0], av, ev);
			_exit(127);
		}
		waitpid(ch, &st, 0);
		CHECK("busybox-sh", WIFEXITED(st) && WEXITSTATUS(st) == 7, "busybox sh did not exit 7");
	}

	// Timings (not checks): a user-mode loop, fresh-page faults, a cheap system call.
	{
		double t = now(CLOCK_MONOTONIC);
		volatile unsigned long acc = 0;
		for (unsigned long i = 0; i < 20000000UL; i++) acc += i;
		double loop = now(CLOCK_MONOTONIC) - t;
		char *pages = mmap(NULL, 256 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		t = now(CLOCK_MONOTONIC);
		for (int i = 0; pages != MAP_FAILED && i < 256; i++) pages[i * 4096] = 1;
		double touch = now(CLOCK_MONOTONIC) - t;
		t = now(CLOCK_MONOTONIC);
		for (int i = 0; i < 200; i++) syscall(SYS_getppid);
		double sc = now(CLOCK_MONOTONIC) - t;
		snprintf(buf, sizeof buf, "timing: user loop %.3f s, page touch %.3f ms/page, getppid %.3f ms/call\n",
			 loop, touch * 1000 / 256, sc * 1000 / 200);
		say(buf);
	}

	snprintf(buf, sizeof buf, "%s; %.3f s after kernel start; rebooting\n", failures ? "SOME FAILED" : "ALL OK", now(CLOCK_BOOTTIME));
	say(buf);
	sync();
	reboot(RB_AUTOBOOT);
	say("reboot returned\n");
	for (;;) pause();
}
