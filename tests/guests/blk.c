/* A polling virtio-blk driver over virtio-mmio (virtio 1.2, 4.2.2 and 5.2), no interrupts: it
 * finds its device from the `virtio_mmio.device=` words on the command line (`blk.dev=N` picks
 * the Nth, default 0) and, by `blk.mode=`:
 *   rw      (default) reads the first READ_SECTORS sectors in one two-segment request and prints
 *           their FNV-1a 64 checksum, writes write_pattern() to the last sector, flushes, reads it
 *           back: `blk: write ok`, `blk: flush ok`, `blk: readback ok`.
 *   ro      the same read, then a write that must fail: `blk: write status 1`.
 *   hostile sends malformed chains, printing `blk: hostile NAME status S len L` for each (S 255:
 *           the device returned the chain without writing a status), then a valid read.
 * Every line starts with `blk: `; the last is `blk: done`. */
#include "rt.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_AVAIL_LOW 0x090
#define REG_QUEUE_AVAIL_HIGH 0x094
#define REG_QUEUE_USED_LOW 0x0a0
#define REG_QUEUE_USED_HIGH 0x0a4
#define REG_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_BLK_RO (1ul << 5)
#define F_BLK_FLUSH (1ul << 9)
#define F_VERSION_1 (1ul << 32)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define D_NEXT 1
#define D_WRITE 2

#define QN 8
#define READ_SECTORS 16
#define NO_STATUS 0xff
/* Not guest RAM for any --memory up to 3 GiB: above the 4 GiB line, below where RAM resumes. */
#define OUTSIDE_RAM 0x140000000ul

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

static struct desc descs[QN] __attribute__((aligned(16)));
static struct {
	u16 flags;
	u16 idx;
	u16 ring[QN];
	u16 used_event;
} avail __attribute__((aligned(4)));
static struct {
	u16 flags;
	u16 idx;
	struct {
		u32 id;
		u32 len;
	} ring[QN];
	u16 avail_event;
} used __attribute__((aligned(4)));

static struct {
	u32 type;
	u32 ioprio;
	u64 sector;
} hdr __attribute__((aligned(16)));
static volatile u8 status;
static u8 data[READ_SECTORS * 512] __attribute__((aligned(4096)));
static u8 sector_buf[512] __attribute__((aligned(512)));

static u64 base;
static u64 capacity;
static u16 last_used;

static u32 rd(u32 off) { return *(volatile u32 *)(base + off); }
static void wr(u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }
static void barrier(void) { __asm__ volatile("" ::: "memory"); }

static void fail(const char *what)
{
	puts("blk: error: ");
	println(what);
	guest_exit();
}

/* The address of the `n`th virtio_mmio.device= word ("4K@0xADDR:IRQ"), 0 when there is none. */
static u64 find_device(u32 n)
{
	const char *key = "virtio_mmio.device=";
	usize klen = strlen(key);
	const char *s = cmdline();
	while (*s) {
		while (*s == ' ')
			s++;
		const char *w = s;
		while (*s && *s != ' ')
			s++;
		if ((usize)(s - w) <= klen || memcmp(w, key, klen))
			continue;
		if (n--)
			continue;
		const char *p = w + klen;
		while (p < s && *p != '@')
			p++;
		if (p + 3 > s || p[1] != '0' || p[2] != 'x')
			return 0;
		u64 v = 0;
		for (p += 3; p < s && *p != ':'; p++) {
			char c = *p;
			u32 d = c >= '0' && c <= '9' ? (u32)(c - '0')
				: c >= 'a' && c <= 'f' ? (u32)(c - 'a' + 10)
				: c >= 'A' && c <= 'F' ? (u32)(c - 'A' + 10) : 99;
			if (d == 99)
				return 0;
			v = v << 4 | d;
		}
		return v;
	}
	return 0;
}

static u64 features;

static void init_device(void)
{
	if (rd(REG_MAGIC) != 0x74726976 || rd(REG_VERSION) != 2 || rd(REG_DEVICE_ID) != 2)
		fail("not a virtio-mmio v2 block device");
	wr(REG_STATUS, 0);
	wr(REG_STATUS, S_ACKNOWLEDGE);
	wr(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(REG_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(REG_DEVICE_FEATURES);
	wr(REG_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(REG_DEVICE_FEATURES) << 32;
	if (!(offered & F_VERSION_1))
		fail("device does not offer VERSION_1");
	features = offered & (F_VERSION_1 | F_BLK_FLUSH | F_BLK_RO);
	wr(REG_DRIVER_FEATURES_SEL, 0);
	wr(REG_DRIVER_FEATURES, (u32)features);
	wr(REG_DRIVER_FEATURES_SEL, 1);
	wr(REG_DRIVER_FEATURES, (u32)(features >> 32));
	wr(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(rd(REG_STATUS) & S_FEATURES_OK))
		fail("device refused our features");
	wr(REG_QUEUE_SEL, 0);
	u32 max = rd(REG_QUEUE_NUM_MAX);
	if (max < QN)
		fail("queue too small");
	wr(REG_QUEUE_NUM, QN);
	wr(REG_QUEUE_DESC_LOW, (u32)(u64)descs);
	wr(REG_QUEUE_DESC_HIGH, (u32)((u64)descs >> 32));
	wr(REG_QUEUE_AVAIL_LOW, (u32)(u64)&avail);
	wr(REG_QUEUE_AVAIL_HIGH, (u32)((u64)&avail >> 32));
	wr(REG_QUEUE_USED_LOW, (u32)(u64)&used);
	wr(REG_QUEUE_USED_HIGH, (u32)((u64)&used >> 32));
	wr(REG_QUEUE_READY, 1);
	wr(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	capacity = rd(REG_CONFIG) | (u64)rd(REG_CONFIG + 4) << 32;
}

/* Makes the chain starting at descriptor `head` available, notifies, and polls the used ring.
 * Returns the used length; fails the guest when the device never answers. */
static u32 kick(u16 head)
{
	avail.ring[avail.idx % QN] = head;
	barrier();
	avail.idx++;
	barrier();
	wr(REG_QUEUE_NOTIFY, 0);
	for (u64 spins = 0; *(volatile u16 *)&used.idx == last_used; spins++) {
		/* About a minute at this machine's guest speed; far longer on hardware. */
		if (spins > 50000000ul)
			fail("timed out waiting for the used ring");
	}
	barrier();
	u32 id = used.ring[last_used % QN].id;
	u32 len = used.ring[last_used % QN].len;
	last_used++;
	if (id != head)
		fail("used ring returned another chain");
	return len;
}

struct buf {
	u64 addr;
	u32 len;
	u16 flags;
};

/* A NEXT-linked chain of `n` buffers from descriptor 0; returns the used length. */
static u32 run_chain(const struct buf *b, int n)
{
	for (int i = 0; i < n; i++) {
		descs[i].addr = b[i].addr;
		descs[i].len = b[i].len;
		descs[i].flags = b[i].flags | (i + 1 < n ? D_NEXT : 0);
		descs[i].next = (u16)(i + 1);
	}
	return kick(0);
}

/* header, then the data buffers, then the status byte. Returns the status. */
static u8 request(u32 type, u64 sector, const struct buf *d, int n, u32 *used_len)
{
	struct buf chain[QN];
	hdr.type = type;
	hdr.ioprio = 0;
	hdr.sector = sector;
	status = NO_STATUS;
	chain[0] = (struct buf){ (u64)&hdr, 16, 0 };
	for (int i = 0; i < n; i++)
		chain[i + 1] = d[i];
	chain[n + 1] = (struct buf){ (u64)&status, 1, D_WRITE };
	u32 len = run_chain(chain, n + 2);
	if (used_len)
		*used_len = len;
	return status;
}

static u64 fnv1a(const u8 *p, usize n)
{
	u64 h = 0xcbf29ce484222325ul;
	for (usize i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ul;
	}
	return h;
}

/* What the rw mode writes to the last sector; the host test rebuilds it. */
static void write_pattern(u8 *p)
{
	const char *m = "ember blk write\n";
	for (u32 i = 0; i < 512; i++)
		p[i] = (u8)(i * 7 + 3);
	for (u32 i = 0; m[i]; i++)
		p[i] = (u8)m[i];
}

static void print_status(const char *what, u8 s, u32 len)
{
	puts("blk: ");
	puts(what);
	puts(" status ");
	put_dec(s);
	puts(" len ");
	put_dec(len);
	nl();
}

static void read_and_checksum(const char *label)
{
	struct buf d[2] = {
		{ (u64)data, sizeof(data) / 2, D_WRITE },
		{ (u64)data + sizeof(data) / 2, sizeof(data) / 2, D_WRITE },
	};
	u32 len;
	memset(data, 0, sizeof(data));
	u8 s = request(T_IN, 0, d, 2, &len);
	print_status(label, s, len);
	puts("blk: checksum ");
	put_hex(fnv1a(data, sizeof(data)));
	nl();
}

static void print_id(void)
{
	static char id[21];
	struct buf d = { (u64)id, 20, D_WRITE };
	memset(id, 0, sizeof(id));
	u8 s = request(T_GET_ID, 0, &d, 1, 0);
	if (s != 0) {
		print_status("get-id", s, 0);
		return;
	}
	puts("blk: id ");
	println(id);
}

static void mode_rw(void)
{
	static u8 back[512];
	struct buf d = { (u64)sector_buf, 512, 0 };
	u32 len;
	write_pattern(sector_buf);
	u8 s = request(T_OUT, capacity - 1, &d, 1, &len);
	if (s != 0) {
		print_status("write", s, len);
		return;
	}
	println("blk: write ok");
	s = request(T_FLUSH, 0, 0, 0, &len);
	if (s != 0) {
		print_status("flush", s, len);
		return;
	}
	println("blk: flush ok");
	struct buf r = { (u64)back, 512, D_WRITE };
	s = request(T_IN, capacity - 1, &r, 1, &len);
	println(s == 0 && !memcmp(back, sector_buf, 512) ? "blk: readback ok" : "blk: readback differs");
}

static void mode_ro(void)
{
	struct buf d = { (u64)sector_buf, 512, 0 };
	u32 len;
	write_pattern(sector_buf);
	u8 s = request(T_OUT, 0, &d, 1, &len);
	puts("blk: write status ");
	put_dec(s);
	nl();
}

static void hostile(const char *name, const struct buf *c, int n, u32 type, u64 sector)
{
	hdr.type = type;
	hdr.ioprio = 0;
	hdr.sector = sector;
	status = NO_STATUS;
	u32 len = run_chain(c, n);
	puts("blk: hostile ");
	puts(name);
	puts(" status ");
	put_dec(status);
	puts(" len ");
	put_dec(len);
	nl();
}

static struct buf B(u64 addr, u32 len, u16 flags) { return (struct buf){ addr, len, flags }; }

static void chain3(struct buf *c, struct buf a, struct buf b, struct buf e)
{
	c[0] = a;
	c[1] = b;
	c[2] = e;
}

static void mode_hostile(void)
{
	const u64 h = (u64)&hdr, st = (u64)&status, d = (u64)data;
	struct buf c[3];

	chain3(c, B(h, 16, 0), B(OUTSIDE_RAM, 512, D_WRITE), B(st, 1, D_WRITE));
	hostile("outside-ram", c, 3, T_IN, 0);
	chain3(c, B(h, 16, D_WRITE), B(d, 512, D_WRITE), B(st, 1, D_WRITE));
	hostile("writable-header", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 512, D_WRITE), B(st, 1, 0));
	hostile("readonly-status", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 512, 0), B(st, 1, D_WRITE));
	hostile("readonly-in-buffer", c, 3, T_IN, 0);
	chain3(c, B(h, 8, 0), B(d, 512, D_WRITE), B(st, 1, D_WRITE));
	hostile("short-header", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 512, D_WRITE), B(st, 0, D_WRITE));
	hostile("empty-status", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 0xfffffe00u, D_WRITE), B(st, 1, D_WRITE));
	hostile("absurd-length", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 512, D_WRITE), B(st, 1, D_WRITE));
	hostile("past-end", c, 3, T_IN, capacity);
	chain3(c, B(h, 16, 0), B(d, 500, D_WRITE), B(st, 1, D_WRITE));
	hostile("unaligned-length", c, 3, T_IN, 0);
	chain3(c, B(h, 16, 0), B(d, 512, D_WRITE), B(st, 1, D_WRITE));
	hostile("unknown-type", c, 3, 0x55, 0);

	/* A loop: 0 -> 1 -> 2 -> 1 -> ... */
	hdr.type = T_IN;
	hdr.sector = 0;
	status = NO_STATUS;
	descs[0] = (struct desc){ h, 16, D_NEXT, 1 };
	descs[1] = (struct desc){ d, 512, D_WRITE | D_NEXT, 2 };
	descs[2] = (struct desc){ st, 1, D_WRITE | D_NEXT, 1 };
	print_status("hostile loop", status, kick(0));
	/* A next index outside the descriptor table. */
	status = NO_STATUS;
	descs[0] = (struct desc){ h, 16, D_NEXT, 200 };
	print_status("hostile bad-next", status, kick(0));

	read_and_checksum("valid-read");
}

void gmain(void *boot)
{
	(void)boot;
	const char *n = param("blk.dev=");
	u32 index = n && n[0] >= '0' && n[0] <= '9' ? (u32)(n[0] - '0') : 0;
	base = find_device(index);
	if (!base)
		fail("no virtio_mmio.device= word for this device on the command line");
	init_device();
	puts("blk: capacity ");
	put_dec(capacity);
	nl();
	puts("blk: features ");
	put_hex(features);
	nl();
	print_id();

	const char *mode = param("blk.mode=");
	if (mode && streq(mode, "hostile")) {
		mode_hostile();
	} else {
		read_and_checksum("read");
		if (mode && streq(mode, "ro"))
			mode_ro();
		else
			mode_rw();
	}
	println("blk: done");
}
