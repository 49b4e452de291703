/* The shared runtime of Ember's test guests: see rt.h. */
#include "rt.h"

#define LSR (COM1 + 5)
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

const u8 *rt_zero_page;
const u8 *rt_pvh_info;

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* The UART is driven as a FIFO-aware 16550A driver does (Linux's 8250 `tx_loadsz`): once the
 * line status shows the transmitter empty, up to TX_FIFO_DEPTH bytes go out before the next look,
 * and a run of bytes goes out in one `rep outsb`. A status read and an OUT per byte cost a
 * guest's console two VM exits per byte; a hypervisor exit on a nested or PVM host costs more
 * than the byte. A UART without working FIFOs (IIR bits 7:6 clear once FCR enabled them) gets
 * one byte per look. */
#define FCR (COM1 + 2)
#define IIR (COM1 + 2)
#define FCR_FIFO_ENABLE 0x01
#define IIR_FIFOS_ON 0xc0
#define TX_FIFO_DEPTH 16

/* Bytes that may still go into the transmitter without a look at LSR: what the FIFO had room
 * for at the last look (it only drains since). */
static usize tx_room;
/* 0 until the first output; then how much one look at an empty transmitter allows. */
static usize tx_load;

static usize tx_wait_room(void)
{
	if (!tx_room) {
		if (!tx_load) {
			outb(FCR, FCR_FIFO_ENABLE);
			tx_load = (inb(IIR) & IIR_FIFOS_ON) == IIR_FIFOS_ON ? TX_FIFO_DEPTH : 1;
		}
		while (!(inb(LSR) & LSR_THR_EMPTY))
			;
		tx_room = tx_load;
	}
	return tx_room;
}

void putn(const char *s, usize n)
{
	while (n) {
		usize k = tx_wait_room();
		if (k > n)
			k = n;
		tx_room -= k;
		n -= k;
		if (k == 1) {
			outb(COM1, (u8)*s++);
			continue;
		}
		putn_unpaced(s, k);
		s += k;
	}
}

void putc(char c) { putn(&c, 1); }

void nl(void) { putc('\n'); }

void put_hex(u64 v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(buf + i);
}

void put_dec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts(buf + i);
}

int getc(void)
{
	while (!(inb(LSR) & LSR_DATA_READY))
		;
	return inb(COM1);
}

/* Long enough for a VMM that stops the guest on an exit request to have done so. */
static void settle(void)
{
	for (volatile u32 i = 0; i < 200000; i++)
		;
}

/* ---- command line ---- */

#define CMDLINE_MAX 2048

const char *cmdline(void)
{
	u64 p = 0;
	if (rt_zero_page)
		p = rd32(rt_zero_page + ZP_CMD_LINE_PTR) |
		    (u64)rd32(rt_zero_page + ZP_EXT_CMD_LINE_PTR) << 32;
	else if (rt_pvh_info)
		p = rd64(rt_pvh_info + PVH_CMDLINE_PADDR);
	return p ? (const char *)p : "";
}

const char *param(const char *key)
{
	static char value[CMDLINE_MAX];
	const char *s = cmdline();
	usize klen = strlen(key);
	while (*s) {
		while (*s == ' ')
			s++;
		const char *w = s;
		while (*s && *s != ' ')
			s++;
		if ((usize)(s - w) >= klen && !memcmp(w, key, klen)) {
			usize n = (usize)(s - w) - klen;
			if (n >= CMDLINE_MAX)
				n = CMDLINE_MAX - 1;
			memcpy(value, w + klen, n);
			value[n] = 0;
			return value;
		}
	}
	return 0;
}

/* ---- zero page ---- */

u32 zp_e820_entries(void)
{
	u32 n = rt_zero_page ? rd8(rt_zero_page + ZP_E820_ENTRIES) : 0;
	return n > E820_MAX_ENTRIES ? E820_MAX_ENTRIES : n;
}

struct e820_entry zp_e820(u32 i)
{
	const u8 *e = rt_zero_page + ZP_E820_TABLE + 20 * i;
	struct e820_entry r = {rd64(e), rd64(e + 8), rd32(e + 16)};
	return r;
}

u64 zp_rsdp(void) { return rt_zero_page ? rd64(rt_zero_page + ZP_ACPI_RSDP_ADDR) : 0; }
u64 zp_ramdisk_image(void) { return rt_zero_page ? rd32(rt_zero_page + ZP_RAMDISK_IMAGE) : 0; }
u32 zp_ramdisk_size(void) { return rt_zero_page ? rd32(rt_zero_page + ZP_RAMDISK_SIZE) : 0; }

/* ---- ACPI ---- */

int checksum_ok(const void *p, usize len)
{
	const u8 *b = p;
	u8 sum = 0;
	while (len--)
		sum = (u8)(sum + rd8(b++));
	return sum == 0;
}

const u8 *acpi_rsdp(void)
{
	u64 a = zp_rsdp();
	if (!a && rt_pvh_info)
		a = rd64(rt_pvh_info + PVH_RSDP_PADDR);
	if (a)
		return phys(a);
	for (a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp(phys(a), "RSD PTR ", 8) && checksum_ok(phys(a), 20))
			return phys(a);
	return 0;
}

const u8 *acpi_table_at(u32 i)
{
	const u8 *rsdp = acpi_rsdp();
	if (!rsdp)
		return 0;
	u64 xsdt = rd8(rsdp + 15) >= 2 ? rd64(rsdp + 24) : 0;
	const u8 *sdt = phys(xsdt ? xsdt : rd32(rsdp + 16));
	usize esize = xsdt ? 8 : 4;
	u32 len = rd32(sdt + 4);
	if (len < 36 || (usize)i >= (len - 36) / esize)
		return 0;
	const u8 *e = sdt + 36 + esize * i;
	return phys(xsdt ? rd64(e) : rd32(e));
}

const u8 *acpi_find(const char *sig)
{
	if (!memcmp(sig, "DSDT", 4)) {
		const u8 *fadt = acpi_find("FACP");
		if (!fadt)
			return 0;
		u32 len = rd32(fadt + 4);
		u64 x = len >= 148 ? rd64(fadt + 140) : 0;
		u64 a = x ? x : rd32(fadt + 40);
		return a ? phys(a) : 0;
	}
	const u8 *t;
	for (u32 i = 0; (t = acpi_table_at(i)); i++)
		if (!memcmp(t, sig, 4))
			return t;
	return 0;
}

/* ---- exits ---- */

__attribute__((noreturn)) static void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

__attribute__((noreturn)) void exit_triple(void)
{
	static const struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} no_idt = {0, 0};
	println("exit: triple fault");
	/* #UD with no IDT escalates to #DF and then a shutdown. (INT3 would work too, but this
	 * machine's KVM cannot emulate it.) */
	__asm__ volatile("lidt %0; ud2" : : "m"(no_idt));
	halt_forever();
}

__attribute__((noreturn)) void exit_i8042(void)
{
	println("exit: i8042 reset");
	outb(0x64, 0xfe);
	settle();
	println("exit: i8042 reset ignored");
	exit_triple();
}

/* SLP_TYP of the DSDT's \_S5_ package: NameOp "_S5_" PackageOp PkgLength NumElements, then the
 * first element as BytePrefix+byte, ZeroOp or OneOp. -1 when absent or malformed. */
static int s5_slp_typ(const u8 *dsdt)
{
	u32 len = rd32(dsdt + 4);
	for (u32 i = 36; i + 8 <= len; i++) {
		if (memcmp(dsdt + i, "_S5_", 4))
			continue;
		const u8 *p = dsdt + i + 4, *end = dsdt + len;
		if (*p++ != 0x12)
			return -1;
		p += 1 + (*p >> 6); /* PkgLength: lead byte's top bits count the bytes that follow */
		p++;                /* NumElements */
		if (p + 2 > end)
			return -1;
		switch (p[0]) {
		case 0x0a:
			return p[1];
		case 0x00:
		case 0x01:
			return p[0];
		default:
			return -1;
		}
	}
	return -1;
}

__attribute__((noreturn)) static void acpi_failed(const char *why)
{
	puts("exit: acpi poweroff failed: ");
	println(why);
	exit_i8042();
}

__attribute__((noreturn)) void exit_acpi(void)
{
	const u8 *fadt = acpi_find("FACP");
	if (!fadt)
		acpi_failed("no FADT");
	if (rd32(fadt + 4) < 256)
		acpi_failed("FADT has no SLEEP_CONTROL_REG");
	const u8 *gas = fadt + 244;
	u8 space = rd8(gas);
	u64 addr = rd64(gas + 4);
	if (!addr)
		acpi_failed("SLEEP_CONTROL_REG is zero");
	const u8 *dsdt = acpi_find("DSDT");
	if (!dsdt)
		acpi_failed("no DSDT");
	int typ = s5_slp_typ(dsdt);
	if (typ < 0)
		acpi_failed("no \\_S5_ package in the DSDT");
	u8 v = (u8)(((typ & 7) << 2) | 0x20);
	puts("exit: acpi poweroff ");
	puts(space == 1 ? "io " : "mem ");
	put_hex(addr);
	puts(" <- ");
	put_hex(v);
	nl();
	if (space == 1)
		outb((u16)addr, v);
	else if (space == 0)
		*(volatile u8 *)addr = v;
	else
		acpi_failed("SLEEP_CONTROL_REG in an unknown address space");
	settle();
	println("exit: acpi poweroff ignored");
	exit_i8042();
}

/* A kernel panic as the guest tells it: through the pvpanic port (QEMU's 0x505, QEMU0001 in the
 * DSDT), whose read gives the events the device takes. */
__attribute__((noreturn)) void exit_pvpanic(void)
{
	puts("exit: pvpanic capability ");
	put_hex(inb(0x505));
	nl();
	outb(0x505, 1);
	settle();
	println("exit: pvpanic ignored");
	exit_i8042();
}

__attribute__((noreturn)) void guest_exit(void)
{
	const char *how = param("exit=");
	if (!how || streq(how, "i8042"))
		exit_i8042();
	if (streq(how, "triple"))
		exit_triple();
	if (streq(how, "acpi"))
		exit_acpi();
	if (streq(how, "pvpanic"))
		exit_pvpanic();
	puts("exit: unknown exit=");
	println(how);
	exit_i8042();
}
