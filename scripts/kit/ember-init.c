/* /init of the Ember guest kit's initramfs: the part of start-up that must be fast, in a tiny
 * static program (raw system calls, no libc), then the shell script /init.sh for the rest.
 *
 * Under a kernel whose code is emulated (Ember's microVM kernel on a kvm_pvm host) every fork and
 * exec of busybox costs about 1.5 s, and a shell init needed three of them (mount, mount, mount)
 * before its first line. This program makes none before the ready line:
 *   - mounts proc, sysfs and devtmpfs, and points its output at /dev/console;
 *   - loads the kernel modules listed in /lib/modules/order (finit_module) unless the kernel has
 *     them built in (/sys/module/NAME) or has no module support (no /proc/modules);
 *   - prints `ember-kit: cpus N`, `ember-kit: memtotal KB`, `ember-kit: ready`;
 *   - then, by `ember.kit=` on the command line (or the action kit.sh built in): `reboot` and
 *     `poweroff` at once (what `reboot -f` / `poweroff -f` do), anything else execs
 *     `/bin/busybox sh /init.sh ACTION TOKEN` (disk test, the shell; only initramfs.cpio has
 *     busybox: the reboot and poweroff archives are /init and the modules).
 * Built by scripts/kit.sh with the host's gcc; see scripts/kit/init.sh for the lines after. */

typedef unsigned long u64;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_dup2 33
#define SYS_execve 59
#define SYS_exit 60
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_finit_module 313
#define SYS_access 21

#define O_RDONLY 0
#define O_RDWR 2
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e)
{
	i64 ret;
	register i64 r10 __asm__("r10") = d;
	register i64 r8 __asm__("r8") = e;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys(n, a, b, c) sys6((n), (i64)(a), (i64)(b), (i64)(c), 0, 0)

static u64 len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static void say(const char *s) { sys(SYS_write, 1, s, len(s)); }

static void say_num(u64 v)
{
	char b[24];
	int i = sizeof(b);
	b[--i] = 0;
	do {
		b[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	say(b + i);
}

static int starts(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* Reads a whole small file into `buf` (NUL-terminated); returns its length, -1 if absent. */
static i64 slurp(const char *path, char *buf, u64 size)
{
	i64 fd = sys(SYS_open, path, O_RDONLY, 0);
	if (fd < 0)
		return -1;
	u64 n = 0;
	for (;;) {
		i64 r = sys(SYS_read, fd, buf + n, size - 1 - n);
		if (r <= 0)
			break;
		n += (u64)r;
		if (n == size - 1)
			break;
	}
	sys(SYS_close, fd, 0, 0);
	buf[n] = 0;
	return (i64)n;
}

static char file[1 << 20];
static char cmdline[4096];
static char action[64] = "@ACTION@";
static char token[256] = "none";

/* Copies the value of `key` in the command line into `out` (at most `size` - 1 bytes). */
static void param(const char *key, char *out, u64 size)
{
	u64 klen = len(key);
	for (char *p = cmdline; *p;) {
		while (*p == ' ' || *p == '\n')
			p++;
		char *w = p;
		while (*p && *p != ' ' && *p != '\n')
			p++;
		if ((u64)(p - w) > klen && starts(w, key)) {
			u64 n = 0;
			for (char *v = w + klen; v < p && n + 1 < size; v++)
				out[n++] = *v;
			out[n] = 0;
		}
	}
}

static void load_modules(void)
{
	if (sys(SYS_access, "/proc/modules", 0, 0) != 0)
		return;
	if (slurp("/lib/modules/order", file, sizeof(file)) < 0)
		return;
	static char path[256];
	for (char *p = file; *p;) {
		char *name = p;
		while (*p && *p != '\n')
			p++;
		char end = *p;
		*p = 0;
		if (*name) {
			u64 n = 0;
			for (const char *s = "/sys/module/"; *s; s++)
				path[n++] = *s;
			for (const char *s = name; *s && n < 200; s++)
				path[n++] = *s;
			path[n] = 0;
			if (sys(SYS_access, path, 0, 0) != 0) {
				n = 0;
				for (const char *s = "/lib/modules/"; *s; s++)
					path[n++] = *s;
				for (const char *s = name; *s && n < 200; s++)
					path[n++] = *s;
				for (const char *s = ".ko"; *s; s++)
					path[n++] = *s;
				path[n] = 0;
				i64 fd = sys(SYS_open, path, O_RDONLY, 0);
				if (fd < 0 || sys(SYS_finit_module, fd, "", 0) != 0) {
					say("ember-kit: insmod ");
					say(name);
					say(" failed\n");
				}
				if (fd >= 0)
					sys(SYS_close, fd, 0, 0);
			}
		}
		if (end)
			p++;
	}
}

void start(void)
{
	sys6(SYS_mount, (i64) "proc", (i64) "/proc", (i64) "proc", 0, 0);
	sys6(SYS_mount, (i64) "sysfs", (i64) "/sys", (i64) "sysfs", 0, 0);
	sys6(SYS_mount, (i64) "devtmpfs", (i64) "/dev", (i64) "devtmpfs", 0, 0);
	/* The kernel opened /dev/console before devtmpfs existed: if the archive had no node, our
	 * output would go nowhere. Reopening is harmless when it did. */
	i64 console = sys(SYS_open, "/dev/console", O_RDWR, 0);
	if (console >= 0) {
		for (int fd = 0; fd < 3; fd++)
			sys(SYS_dup2, console, fd, 0);
		if (console > 2)
			sys(SYS_close, console, 0, 0);
	}
	if (slurp("/proc/cmdline", cmdline, sizeof(cmdline)) < 0)
		cmdline[0] = 0;
	param("ember.kit=", action, sizeof(action));
	param("ember.kit.token=", token, sizeof(token));

	load_modules();

	u64 cpus = 0;
	if (slurp("/proc/cpuinfo", file, sizeof(file)) > 0)
		for (char *p = file; *p; p++)
			if ((p == file || p[-1] == '\n') && starts(p, "processor"))
				cpus++;
	u64 mem = 0;
	if (slurp("/proc/meminfo", file, sizeof(file)) > 0 && starts(file, "MemTotal:"))
		for (char *p = file + 9; *p && *p != '\n'; p++)
			if (*p >= '0' && *p <= '9')
				mem = mem * 10 + (u64)(*p - '0');
	say("ember-kit: cpus ");
	say_num(cpus);
	say("\nember-kit: memtotal ");
	say_num(mem);
	say("\nember-kit: ready\n");

	if (same(action, "reboot"))
		sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0, 0);
	if (same(action, "poweroff"))
		sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0,
		     0);
	const char *argv[] = { "sh", "/init.sh", action, token, 0 };
	const char *envp[] = { "PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/root", "TERM=linux", 0 };
	sys(SYS_execve, "/bin/busybox", argv, envp);
	say("ember-kit: cannot run /bin/busybox sh /init.sh\n");
	sys(SYS_exit, 1, 0, 0);
}

/* The kernel enters here with the stack holding argc, argv, envp; none are needed. */
__asm__(".globl _start\n_start:\n\tand $-16, %rsp\n\tcall start\n\thlt\n");
