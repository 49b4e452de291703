/* vsock-peer: the guest's side of Ember's vsock test with Linux (tests/integration/vsock.rs).
 * A static program run as the microVM's first process (`rdinit=/vsock-peer`, appended to the
 * kit's initramfs by the test); the kit's busybox has no AF_VSOCK client or server.
 *
 * It mounts proc, sysfs and devtmpfs, reports what the kernel made of the vsock device, then
 * runs the steps its kernel parameters name, in this order:
 *   vsock.listen=P   accepts one connection on port P (the host's, through `CONNECT P`)
 *   vsock.connect=Q  connects to the host (CID 2) on port Q (Ember connects to <uds>_Q)
 *   vsock.stall=S    accepts one connection on port S and never reads it
 * On each of the first two it receives until end of file, checking every byte against the
 * host's pattern, then sends vsock.bytes=N bytes of its own pattern and closes. Both patterns
 * are the byte stream of xorshift64 words (little-endian) from a fixed seed, so either end can
 * check the other byte for byte; FNV-1a 64 hashes of each stream are printed as well.
 * Console lines all start with `vsock-peer: `. Without a stall step it powers off at the end;
 * with one it waits there until Ember is stopped. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <linux/vm_sockets.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HOST_TO_GUEST_SEED 0x9e3779b97f4a7c15ull
#define GUEST_TO_HOST_SEED 0xd1b54a32d192ed03ull
#define CHUNK (64 * 1024)

struct pattern {
	uint64_t state;
	uint64_t word;
	int left; /* bytes of `word` not yet used */
};

static void pattern_init(struct pattern *p, uint64_t seed)
{
	p->state = seed;
	p->left = 0;
}

static uint8_t pattern_next(struct pattern *p)
{
	if (p->left == 0) {
		uint64_t x = p->state;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p->state = x;
		p->word = x;
		p->left = 8;
	}
	uint8_t b = (uint8_t)p->word;
	p->word >>= 8;
	p->left--;
	return b;
}

static uint64_t fnv(uint64_t h, const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}
#define FNV_START 0xcbf29ce484222325ull

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static char cmdline[4096];

/* The value of kernel parameter `key` (e.g. "vsock.listen="), or NULL. */
static const char *param(const char *key)
{
	static char value[64];
	size_t klen = strlen(key);
	for (char *p = cmdline; *p;) {
		while (*p == ' ' || *p == '\n')
			p++;
		char *w = p;
		while (*p && *p != ' ' && *p != '\n')
			p++;
		if ((size_t)(p - w) > klen && strncmp(w, key, klen) == 0) {
			size_t n = (size_t)(p - w) - klen;
			if (n >= sizeof(value))
				n = sizeof(value) - 1;
			memcpy(value, w + klen, n);
			value[n] = 0;
			return value;
		}
	}
	return NULL;
}

static void report_device(void)
{
	printf("vsock-peer: dev-vsock %s\n", access("/dev/vsock", F_OK) == 0 ? "yes" : "no");
	DIR *d = opendir("/sys/bus/virtio/devices");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[300], id[32] = "";
		snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", e->d_name);
		FILE *f = fopen(path, "r");
		if (f) {
			if (fgets(id, sizeof(id), f))
				id[strcspn(id, "\n")] = 0;
			fclose(f);
		}
		printf("vsock-peer: virtio %s device %s\n", e->d_name, id);
	}
	if (d)
		closedir(d);
	int fd = open("/dev/vsock", O_RDONLY);
	unsigned int cid = 0;
	if (fd >= 0 && ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) == 0)
		printf("vsock-peer: cid %u\n", cid);
	if (fd >= 0)
		close(fd);
}

static int listen_on(unsigned port)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(s, 4) != 0) {
		printf("vsock-peer: cannot listen on %u: %s\n", port, strerror(errno));
		return -1;
	}
	printf("vsock-peer: listening %u\n", port);
	fflush(stdout);
	int c = accept(s, NULL, NULL);
	if (c < 0)
		printf("vsock-peer: accept on %u failed: %s\n", port, strerror(errno));
	close(s);
	return c;
}

static int connect_to(unsigned port)
{
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
	if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)) != 0) {
		printf("vsock-peer: cannot connect to host port %u: %s\n", port, strerror(errno));
		return -1;
	}
	return s;
}

static uint8_t buf[CHUNK];

/* Receives the host's stream to its end, then sends `bytes` of ours and closes. */
static void exchange(const char *name, int fd, unsigned long long bytes)
{
	struct pattern want;
	pattern_init(&want, HOST_TO_GUEST_SEED);
	unsigned long long got = 0, bad_at = 0;
	int bad = 0;
	uint64_t h = FNV_START;
	double t0 = now_ms(), first = 0;
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			printf("vsock-peer: %s read failed after %llu bytes: %s\n", name, got,
			       strerror(errno));
			break;
		}
		if (n == 0)
			break;
		if (got == 0)
			first = now_ms();
		for (ssize_t i = 0; i < n; i++)
			if (pattern_next(&want) != buf[i] && !bad) {
				bad = 1;
				bad_at = got + (unsigned long long)i;
			}
		h = fnv(h, buf, (size_t)n);
		got += (unsigned long long)n;
	}
	double t1 = now_ms();
	if (bad)
		printf("vsock-peer: %s received %llu bytes bad at %llu fnv %016llx in %.0f ms\n", name,
		       got, bad_at, (unsigned long long)h, t1 - (first ? first : t0));
	else
		printf("vsock-peer: %s received %llu bytes ok fnv %016llx in %.0f ms\n", name, got,
		       (unsigned long long)h, t1 - (first ? first : t0));
	fflush(stdout);

	struct pattern ours;
	pattern_init(&ours, GUEST_TO_HOST_SEED);
	h = FNV_START;
	unsigned long long sent = 0;
	t0 = now_ms();
	while (sent < bytes) {
		size_t n = bytes - sent < CHUNK ? (size_t)(bytes - sent) : CHUNK;
		for (size_t i = 0; i < n; i++)
			buf[i] = pattern_next(&ours);
		h = fnv(h, buf, n);
		size_t off = 0;
		while (off < n) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				printf("vsock-peer: %s write failed after %llu bytes: %s\n", name,
				       sent + off, strerror(errno));
				close(fd);
				return;
			}
			off += (size_t)w;
		}
		sent += n;
	}
	printf("vsock-peer: %s sent %llu bytes fnv %016llx in %.0f ms\n", name, sent,
	       (unsigned long long)h, now_ms() - t0);
	fflush(stdout);
	close(fd);
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	/* The kernel opened /dev/console before devtmpfs existed: our output needs it again. */
	int console = open("/dev/console", O_RDWR);
	if (console >= 0) {
		for (int fd = 0; fd < 3; fd++)
			dup2(console, fd);
		if (console > 2)
			close(console);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof(cmdline) - 1);
		cmdline[n > 0 ? n : 0] = 0;
		close(fd);
	}
	const char *v = param("vsock.bytes=");
	unsigned long long bytes = v ? strtoull(v, NULL, 10) : 1 << 20;
	printf("vsock-peer: ready, %llu bytes each way\n", bytes);
	report_device();

	if ((v = param("vsock.listen="))) {
		int c = listen_on((unsigned)strtoul(v, NULL, 10));
		if (c >= 0)
			exchange("host-initiated", c, bytes);
	}
	if ((v = param("vsock.connect="))) {
		int c = connect_to((unsigned)strtoul(v, NULL, 10));
		if (c >= 0)
			exchange("guest-initiated", c, bytes);
	}
	if ((v = param("vsock.stall="))) {
		int c = listen_on((unsigned)strtoul(v, NULL, 10));
		printf("vsock-peer: stalling %s\n", c >= 0 ? "accepted" : "failed");
		fflush(stdout);
		for (;;)
			pause();
	}
	printf("vsock-peer: done\n");
	fflush(stdout);
	sync();
	reboot(LINUX_REBOOT_CMD_POWER_OFF);
	return 0;
}
