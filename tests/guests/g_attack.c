/* A hostile guest: writes garbage to every device register Ember exposes and touches port and
 * MMIO addresses where no device is, with every access width, then restores its console and
 * prints `attack: survived` and exits (exit=..., i8042 reset by default). Ember must serve all of
 * it without dying; the test checks the exit status and that no panic was printed.
 *
 * Two writes are never made, so that the VM lives to the end: 0xFE to the i8042 command port
 * (reset) and an S5 sleep request (SLP_EN with SLP_TYP 5) to the ACPI sleep control register.
 * The pseudo-random sequence is fixed (attack.seed=N on the command line changes it) so a
 * failure can be replayed. */
#include "rt.h"

#define I8042_DATA 0x60
#define I8042_CMD 0x64
#define ACPI_SLEEP 0x600
#define VIRTIO_BASE 0xd0000000ul
#define VIRTIO_SLOT 0x1000ul
#define VIRTIO_SLOTS 4
#define VIRTIO_MAGIC 0x74726976u
#define REG_STATUS 0x070
#define UNCLAIMED_PORT 0x1234
#define UNCLAIMED_MMIO 0xe0000000ul
/* How many garbage writes each device gets. Each access is a VM exit (~15 us here). */
#define ROUNDS 64

static u64 rng_state = 0x9e3779b97f4a7c15ul;

static u64 rnd(void)
{
	/* xorshift64*: no multiply-free requirement, just integer ops. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dul;
}

static void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void mmio_write(u64 addr, int width, u64 v)
{
	switch (width) {
	case 1: *(volatile u8 *)addr = (u8)v; break;
	case 2: *(volatile u16 *)addr = (u16)v; break;
	case 4: *(volatile u32 *)addr = (u32)v; break;
	default: *(volatile u64 *)addr = v; break;
	}
}

static u64 mmio_read(u64 addr, int width)
{
	switch (width) {
	case 1: return *(volatile u8 *)addr;
	case 2: return *(volatile u16 *)addr;
	case 4: return *(volatile u32 *)addr;
	default: return *(volatile u64 *)addr;
	}
}

/* Whether any byte of v would ask for S5 if it reached the ACPI sleep control register. */
static int is_s5(u64 v, int width)
{
	for (int i = 0; i < width; i++) {
		u8 b = (u8)(v >> (8 * i));
		if ((b & 0x20) && ((b >> 2) & 7) == 5)
			return 1;
	}
	return 0;
}

/* Port accesses of every width at each port of [base, base+len), plus ones straddling its ends. */
static u64 attack_ports(u16 base, u16 len, int avoid_reset, int avoid_s5)
{
	u64 sink = 0;
	for (int r = 0; r < ROUNDS; r++) {
		u16 port = (u16)(base - 1 + rnd() % (len + 2u));
		int width = 1 << (rnd() % 3);
		u64 v = rnd();
		if (avoid_reset && port <= I8042_CMD && port + width > I8042_CMD &&
		    (u8)(v >> (8 * (I8042_CMD - port))) == 0xfe)
			v ^= 1ul << (8 * (I8042_CMD - port));
		if (avoid_s5 && is_s5(v, width))
			continue;
		switch (width) {
		case 1: outb(port, (u8)v); sink += inb(port); break;
		case 2: outw(port, (u16)v); sink += inw(port); break;
		default: outl(port, (u32)v); sink += inl(port); break;
		}
	}
	return sink;
}

static void restore_console(void)
{
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x03); /* LCR: 8N1, DLAB off */
	outb(COM1 + 4, 0x08); /* MCR: OUT2, loopback off */
	while (inb(COM1 + 5) & 0x01) /* drop whatever loopback put in the receive FIFO */
		(void)inb(COM1);
}

static void attack_virtio(void)
{
	for (u64 slot = 0; slot < VIRTIO_SLOTS; slot++) {
		u64 base = VIRTIO_BASE + slot * VIRTIO_SLOT;
		u32 magic = (u32)mmio_read(base, 4);
		puts("attack: virtio slot ");
		put_dec(slot);
		puts(" magic ");
		put_hex(magic);
		nl();
		if (magic != VIRTIO_MAGIC)
			continue;
		for (int r = 0; r < 4 * ROUNDS; r++) {
			/* Registers and config space, any alignment, every width. */
			u64 off = rnd() % 0x200;
			int width = 1 << (rnd() % 4);
			mmio_write(base + off, width, rnd());
			(void)mmio_read(base + (rnd() % 0x200), 1 << (rnd() % 4));
		}
		/* Leave it reset, as a driver that gives up would. */
		mmio_write(base + REG_STATUS, 4, 0);
		puts("attack: virtio slot ");
		put_dec(slot);
		puts(" status after reset ");
		put_hex(mmio_read(base + REG_STATUS, 4));
		nl();
	}
}

static void attack_unclaimed(void)
{
	u64 sink = 0;
	for (int width = 1; width <= 4; width <<= 1) {
		switch (width) {
		case 1: outb(UNCLAIMED_PORT, 0xa5); sink += inb(UNCLAIMED_PORT); break;
		case 2: outw(UNCLAIMED_PORT, 0xa5a5); sink += inw(UNCLAIMED_PORT); break;
		default: outl(UNCLAIMED_PORT, 0xa5a5a5a5); sink += inl(UNCLAIMED_PORT); break;
		}
	}
	for (int width = 1; width <= 8; width <<= 1) {
		mmio_write(UNCLAIMED_MMIO + 8 * width, width, 0x5a5a5a5a5a5a5a5aul);
		sink += mmio_read(UNCLAIMED_MMIO + 8 * width, width);
	}
	/* Unclaimed reads return all ones, as on a PC. */
	puts("attack: unclaimed port read ");
	put_hex(inl(UNCLAIMED_PORT));
	puts(" mmio read ");
	put_hex(mmio_read(UNCLAIMED_MMIO, 8));
	nl();
	(void)sink;
}

static u64 parse_dec(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

void gmain(void *boot)
{
	(void)boot;
	const char *seed = param("attack.seed=");
	if (seed)
		rng_state ^= parse_dec(seed) * 0x9e3779b97f4a7c15ul + 1;
	println("attack: ready");

	(void)attack_ports(COM1, 8, 0, 0);
	restore_console();
	println("attack: serial done");

	(void)attack_ports(I8042_DATA, 5, 1, 0);
	println("attack: i8042 done");

	(void)attack_ports(ACPI_SLEEP, 2, 0, 1);
	println("attack: acpi done");

	attack_virtio();
	println("attack: virtio done");

	attack_unclaimed();
	println("attack: survived");
}
