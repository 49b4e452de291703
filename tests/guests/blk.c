/* A polling virtio-blk driver over virtio-mmio (virtio 1.2, 4.2.2 and 5.2), no interrupts: it
 * finds its device from the `virtio_mmio.device=` words on the command line (`blk.dev=N` picks
 * the Nth, default 0) and, by `blk.mode=`:
 *   rw      (default) reads the first READ_SECTORS sectors in one two-segment request and prints
 *           their FNV-1a 64 checksum, writes write_pattern() to the last sector, flushes, reads it
 *           back: `blk: write ok`, `blk: flush ok`, `blk: readback ok`. `blk.sector=N` writes
 *           sector N instead, `blk.tag=T` (0-255) makes the pattern its own (tests of copy-on-write
 *           disks tell one VM's write from another's by it).
 *   ro      the same read, then a write that must fail: `blk: write status 1`.
 *   hostile sends malformed chains, printing `blk: hostile NAME status S len L` for each (S 255:
 *           the device returned the chain without writing a status), then a valid read.
 *   bench   a disk benchmark with as few guest instructions per byte as possible (on kvm_pvm guest
 *           code is ~1000x slower, the device's copies are not): see mode_bench().
 *   flood   keeps the queue full of 1 MiB writes, each FLOOD_FLUSH_EVERY-th chain a FLUSH, for
 *           ever (`blk: flooding` once they are in flight): a guest that keeps its disk busy while
 *           the host stops Ember. With `blk.flood.reads=N` it also times N reads of the Status
 *           register meanwhile, as an interrupt handler would make them, and prints `blk: status
 *           read tsc mean M max X over N` (TSC cycles).
 * Every line starts with `blk: ` (`bench: ` for the benchmark's phase lines); the last is
 * `blk: done`. */
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

/* The queue size the rw, ro and hostile modes use (the hostile chains count on it), and the
 * largest, which the benchmark uses: its requests carry up to QN_MAX - 2 data segments. */
#define QN 8
#define QN_MAX 256
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

/* Sized for QN_MAX; the driver uses the first `qn` entries (EVENT_IDX is not negotiated, so
 * used_event and avail_event are never read). */
static struct desc descs[QN_MAX] __attribute__((aligned(16)));
static struct {
	u16 flags;
	u16 idx;
	u16 ring[QN_MAX];
	u16 used_event;
} avail __attribute__((aligned(4)));
static struct {
	u16 flags;
	u16 idx;
	struct {
		u32 id;
		u32 len;
	} ring[QN_MAX];
	u16 avail_event;
} used __attribute__((aligned(4)));
static u32 qn = QN;

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
	if (max < qn)
		fail("queue too small");
	wr(REG_QUEUE_NUM, qn);
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
	avail.ring[avail.idx % qn] = head;
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
	u32 id = used.ring[last_used % qn].id;
	u32 len = used.ring[last_used % qn].len;
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

/* Writes a NEXT-linked chain of `n` buffers from descriptor 0. */
static void set_chain(const struct buf *b, int n)
{
	for (int i = 0; i < n; i++) {
		descs[i].addr = b[i].addr;
		descs[i].len = b[i].len;
		descs[i].flags = b[i].flags | (i + 1 < n ? D_NEXT : 0);
		descs[i].next = (u16)(i + 1);
	}
}

/* A NEXT-linked chain of `n` buffers from descriptor 0; returns the used length. */
static u32 run_chain(const struct buf *b, int n)
{
	set_chain(b, n);
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

static u64 param_u64(const char *key, u64 def);

/* What the rw mode writes; the host test rebuilds it. */
static void write_pattern(u8 *p, u64 tag)
{
	const char *m = "ember blk write\n";
	for (u32 i = 0; i < 512; i++)
		p[i] = (u8)(i * 7 + 3 + tag);
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
	u64 sector = param_u64("blk.sector=", capacity - 1);
	write_pattern(sector_buf, param_u64("blk.tag=", 0) & 0xff);
	u8 s = request(T_OUT, sector, &d, 1, &len);
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
	s = request(T_IN, sector, &r, 1, &len);
	println(s == 0 && !memcmp(back, sector_buf, 512) ? "blk: readback ok" : "blk: readback differs");
}

static void mode_ro(void)
{
	struct buf d = { (u64)sector_buf, 512, 0 };
	u32 len;
	write_pattern(sector_buf, 0);
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

/* ---- bench ----
 * On kvm_pvm a guest instruction costs ~1000x its native time but the device moves the data into
 * guest memory on the host, so the benchmark keeps guest work per byte tiny: 1 MiB requests whose
 * chain is built once per phase (only the header's sector changes), one request in flight, the
 * used ring polled. Phases, in order, each framed by `bench: NAME start` and `bench: NAME done`
 * lines that the host timestamps as they arrive (scripts/bench-disk.sh), then
 * `bench: NAME bytes B requests R tsc T` (T: RDTSC ticks between the two lines):
 *   seq-read   the whole disk, front to back
 *   seq-write  the whole disk again, each request writing the 1 MiB buffer (after seq-read it
 *              holds the disk's last MiB, so the host can check every MiB of the image after)
 *   flush      one VIRTIO_BLK_T_FLUSH
 *   rand-read  `blk.rand=N` (default 10000) 4 KiB reads at 4 KiB-aligned offsets drawn by an LCG
 *              (Knuth's MMIX constants, seed 1: block = (x >> 33) % blocks), the same sequence as
 *              the host-side driver and baseline (devices/examples/blk_bench.rs)
 * `blk.seg=BYTES` (default 8192, a multiple of 512) sets the data segment size of the 1 MiB
 * requests: 128 segments by default, like a Linux driver's scatter list of non-contiguous pages. */

#define BENCH_REQ (1u << 20)
#define BENCH_BLOCK 4096u

static u8 bench_buf[BENCH_REQ] __attribute__((aligned(4096)));
static struct buf bench_bufs[QN_MAX];

static u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

/* The decimal value of `key`, `def` when absent or not a plain number. */
static u64 param_u64(const char *key, u64 def)
{
	const char *v = param(key);
	if (!v || !*v)
		return def;
	u64 n = 0;
	for (; *v; v++) {
		if (*v < '0' || *v > '9')
			return def;
		n = n * 10 + (u64)(*v - '0');
	}
	return n;
}

/* Header, `bytes` of bench_buf as segments of `seg` bytes (device-writable when `data_flags` is
 * D_WRITE), status: the chain of every request of a phase. */
static void bench_chain(u16 data_flags, u32 bytes, u32 seg)
{
	int n = 0;
	bench_bufs[n++] = (struct buf){ (u64)&hdr, 16, 0 };
	for (u32 off = 0; off < bytes; off += seg)
		bench_bufs[n++] = (struct buf){ (u64)bench_buf + off, bytes - off < seg ? bytes - off : seg,
						data_flags };
	bench_bufs[n++] = (struct buf){ (u64)&status, 1, D_WRITE };
	set_chain(bench_bufs, n);
}

static u64 bench_start(const char *name)
{
	puts("bench: ");
	puts(name);
	puts(" start\n");
	return rdtsc();
}

/* The `done` line goes out first and alone, so its arrival on the host marks the phase's end. */
static void bench_done(const char *name, u64 t0, u64 bytes, u64 requests)
{
	u64 ticks = rdtsc() - t0;
	puts("bench: ");
	puts(name);
	puts(" done\n");
	puts("bench: ");
	puts(name);
	puts(" bytes ");
	put_dec(bytes);
	puts(" requests ");
	put_dec(requests);
	puts(" tsc ");
	put_dec(ticks);
	nl();
}

static void bench_check(const char *name, u64 sector, u32 len, u32 want)
{
	if (status == 0 && len == want)
		return;
	puts("bench: ");
	puts(name);
	puts(" failed at sector ");
	put_dec(sector);
	puts(" status ");
	put_dec(status);
	puts(" len ");
	put_dec(len);
	nl();
	fail("benchmark request failed");
}

/* The whole disk in BENCH_REQ requests of `type` (T_IN or T_OUT). */
static void bench_seq(const char *name, u32 type, u32 seg)
{
	const u64 per = BENCH_REQ / 512;
	const u16 flags = type == T_IN ? D_WRITE : 0;
	u32 bytes = BENCH_REQ;
	u64 requests = 0;
	hdr.type = type;
	hdr.ioprio = 0;
	bench_chain(flags, bytes, seg);
	u64 t0 = bench_start(name);
	for (u64 s = 0; s < capacity; s += per) {
		if (capacity - s < per) {
			bytes = (u32)((capacity - s) * 512);
			bench_chain(flags, bytes, seg);
		}
		hdr.sector = s;
		status = NO_STATUS;
		u32 len = kick(0);
		bench_check(name, s, len, type == T_IN ? bytes + 1 : 1);
		requests++;
	}
	bench_done(name, t0, capacity * 512, requests);
}

static void bench_flush(void)
{
	struct buf c[2] = { { (u64)&hdr, 16, 0 }, { (u64)&status, 1, D_WRITE } };
	hdr.type = T_FLUSH;
	hdr.sector = 0;
	set_chain(c, 2);
	u64 t0 = bench_start("flush");
	status = NO_STATUS;
	u32 len = kick(0);
	bench_check("flush", 0, len, 1);
	bench_done("flush", t0, 0, 1);
}

static void bench_rand(u64 count)
{
	const u64 blocks = capacity / (BENCH_BLOCK / 512);
	u64 x = 1;
	hdr.type = T_IN;
	hdr.ioprio = 0;
	bench_chain(D_WRITE, BENCH_BLOCK, BENCH_BLOCK);
	u64 t0 = bench_start("rand-read");
	for (u64 i = 0; i < count; i++) {
		x = x * 6364136223846793005ul + 1442695040888963407ul;
		u64 sector = ((x >> 33) % blocks) * (BENCH_BLOCK / 512);
		hdr.sector = sector;
		status = NO_STATUS;
		u32 len = kick(0);
		bench_check("rand-read", sector, len, BENCH_BLOCK + 1);
	}
	bench_done("rand-read", t0, count * BENCH_BLOCK, count);
}

static void mode_bench(void)
{
	u64 seg = param_u64("blk.seg=", 8192);
	u64 count = param_u64("blk.rand=", 10000);
	if (!seg || seg % 512 || seg > BENCH_REQ || BENCH_REQ / seg > QN_MAX - 2)
		fail("blk.seg= must be a multiple of 512 that splits 1 MiB into at most 254 segments");
	u32 seg_max = rd(REG_CONFIG + 12);
	if (BENCH_REQ / seg > seg_max)
		fail("the device's seg_max is below the segments per request");
	if (capacity < BENCH_REQ / 512)
		fail("the benchmark needs a disk of at least 1 MiB");
	puts("bench: request ");
	put_dec(BENCH_REQ);
	puts(" segments ");
	put_dec(BENCH_REQ / seg);
	puts(" of ");
	put_dec(seg);
	nl();
	bench_seq("seq-read", T_IN, (u32)seg);
	bench_seq("seq-write", T_OUT, (u32)seg);
	if (features & F_BLK_FLUSH)
		bench_flush();
	bench_rand(count);
}

#define FLOOD_CHAINS (QN_MAX / 3)
#define FLOOD_BYTES (1u << 20)
#define FLOOD_FLUSH_EVERY 4
static u8 flood_buf[FLOOD_BYTES] __attribute__((aligned(4096)));
static struct {
	u32 type;
	u32 ioprio;
	u64 sector;
} flood_hdr[FLOOD_CHAINS] __attribute__((aligned(16)));
static u8 flood_status[FLOOD_CHAINS];

static void mode_flood(void)
{
	u64 per = FLOOD_BYTES / 512;
	if (capacity < per * FLOOD_CHAINS)
		fail("flood needs a disk of at least 85 MiB");
	for (u32 i = 0; i < FLOOD_CHAINS; i++) {
		int flush = (features & F_BLK_FLUSH) && i % FLOOD_FLUSH_EVERY == FLOOD_FLUSH_EVERY - 1;
		flood_hdr[i].type = flush ? T_FLUSH : T_OUT;
		flood_hdr[i].sector = flush ? 0 : i * per;
		u16 d = (u16)(3 * i);
		descs[d] = (struct desc){ (u64)&flood_hdr[i], 16, D_NEXT, (u16)(d + 1) };
		if (flush) {
			descs[d].next = (u16)(d + 2);
		} else {
			descs[d + 1] = (struct desc){ (u64)flood_buf, FLOOD_BYTES, D_NEXT, (u16)(d + 2) };
		}
		descs[d + 2] = (struct desc){ (u64)&flood_status[i], 1, D_WRITE, 0 };
		avail.ring[avail.idx % qn] = d;
		barrier();
		avail.idx++;
	}
	barrier();
	wr(REG_QUEUE_NOTIFY, 0);
	println("blk: flooding");
	u64 reads = param_u64("blk.flood.reads=", 0), done = 0, sum = 0, max = 0;
	/* Each chain the device returns goes straight back in. */
	for (;;) {
		if (done < reads) {
			u64 t0 = rdtsc();
			(void)rd(REG_STATUS);
			u64 t = rdtsc() - t0;
			sum += t;
			max = t > max ? t : max;
			if (++done == reads) {
				puts("blk: status read tsc mean ");
				put_dec(sum / reads);
				puts(" max ");
				put_dec(max);
				puts(" over ");
				put_dec(reads);
				nl();
			}
		}
		int again = 0;
		while (*(volatile u16 *)&used.idx != last_used) {
			barrier();
			u32 id = used.ring[last_used % qn].id;
			last_used++;
			avail.ring[avail.idx % qn] = (u16)id;
			barrier();
			avail.idx++;
			again = 1;
		}
		if (again) {
			barrier();
			wr(REG_QUEUE_NOTIFY, 0);
		}
	}
}

void gmain(void *boot)
{
	(void)boot;
	const char *n = param("blk.dev=");
	u32 index = n && n[0] >= '0' && n[0] <= '9' ? (u32)(n[0] - '0') : 0;
	base = find_device(index);
	if (!base)
		fail("no virtio_mmio.device= word for this device on the command line");
	const char *mode = param("blk.mode=");
	int bench = mode && streq(mode, "bench");
	int flood = mode && streq(mode, "flood");
	if (bench || flood)
		qn = QN_MAX;
	init_device();
	puts("blk: capacity ");
	put_dec(capacity);
	nl();
	puts("blk: features ");
	put_hex(features);
	nl();
	print_id();

	if (bench) {
		mode_bench();
	} else if (flood) {
		mode_flood();
	} else if (mode && streq(mode, "hostile")) {
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
