/* Walks the MP table and the ACPI tables: CPU counts, checksums, the hardware-reduced flag. */
#include "rt.h"

static const u8 *mp_floating_pointer(void)
{
	static const u64 ranges[][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}};
	for (u32 r = 0; r < 2; r++)
		for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16)
			if (!memcmp(phys(a), "_MP_", 4))
				return phys(a);
	return 0;
}

static void mptable(void)
{
	const u8 *fp = mp_floating_pointer();
	if (!fp) {
		println("mptable: missing");
		return;
	}
	if (!checksum_ok(fp, 16 * (usize)rd8(fp + 8))) {
		println("mptable: bad checksum in the floating pointer");
		return;
	}
	const u8 *ct = phys(rd32(fp + 4));
	if (!ct || memcmp(ct, "PCMP", 4)) {
		println("mptable: missing configuration table");
		return;
	}
	if (!checksum_ok(ct, rd16(ct + 4))) {
		println("mptable: bad checksum in the configuration table");
		return;
	}
	const u8 *e = ct + 44, *end = ct + rd16(ct + 4);
	u32 count = rd16(ct + 34), cpus = 0;
	for (u32 i = 0; i < count && e < end; i++) {
		if (rd8(e) == 0) { /* processor: 20 bytes, CPU flags bit 0 = enabled */
			cpus += rd8(e + 3) & 1;
			e += 20;
		} else {
			e += 8;
		}
	}
	puts("mptable cpus: ");
	put_dec(cpus);
	nl();
}

static const u8 *bad_table;

static void check(const u8 *t, usize len)
{
	if (!bad_table && !checksum_ok(t, len))
		bad_table = t;
}

static void acpi(void)
{
	const u8 *rsdp = acpi_rsdp();
	if (!rsdp) {
		println("acpi: missing rsdp");
		return;
	}
	puts("acpi rsdp: ");
	put_hex((u64)rsdp);
	println(zp_rsdp() ? " (zero page)" : " (scan)");
	check(rsdp, 20);
	if (rd8(rsdp + 15) >= 2)
		check(rsdp, rd32(rsdp + 20));
	u64 xsdt = rd8(rsdp + 15) >= 2 ? rd64(rsdp + 24) : 0;
	const u8 *sdt = phys(xsdt ? xsdt : rd32(rsdp + 16));
	check(sdt, rd32(sdt + 4));
	puts("acpi tables: ");
	putn((const char *)sdt, 4);
	const u8 *t;
	for (u32 i = 0; (t = acpi_table_at(i)); i++) {
		putc(' ');
		putn((const char *)t, 4);
		check(t, rd32(t + 4));
	}
	const u8 *dsdt = acpi_find("DSDT");
	if (dsdt) {
		puts(" DSDT");
		check(dsdt, rd32(dsdt + 4));
	}
	nl();
	if (bad_table) {
		puts("acpi: bad checksum in ");
		putn((const char *)bad_table, bad_table == rsdp ? 8 : 4);
		nl();
	} else {
		println("acpi checksums: ok");
	}

	const u8 *madt = acpi_find("APIC");
	if (!madt) {
		println("madt: missing");
	} else {
		u32 cpus = 0;
		const u8 *e = madt + 44, *end = madt + rd32(madt + 4);
		while (e + 2 <= end && rd8(e + 1) >= 2) {
			if (rd8(e) == 0) /* processor local APIC: flags at 4 */
				cpus += rd32(e + 4) & 1;
			else if (rd8(e) == 9) /* processor local x2APIC: flags at 8 */
				cpus += rd32(e + 8) & 1;
			e += rd8(e + 1);
		}
		puts("madt cpus: ");
		put_dec(cpus);
		nl();
	}

	const u8 *fadt = acpi_find("FACP");
	if (!fadt)
		println("fadt: missing");
	else if (rd32(fadt + 4) >= 116 && (rd32(fadt + 112) & (1u << 20)))
		println("fadt: hw-reduced");
	else
		println("fadt: not hw-reduced");
}

void gmain(void *boot)
{
	(void)boot;
	mptable();
	acpi();
}
