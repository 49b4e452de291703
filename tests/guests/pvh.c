/* Booted through its PVH note: checks hvm_start_info and prints what it describes. */
#include "rt.h"

PVH_GUEST();

void gmain(void *boot)
{
	const u8 *si = boot;
	u32 magic = rd32(si), version = rd32(si + 4);
	if (magic != PVH_MAGIC) {
		puts("pvh: bad magic ");
		put_hex(magic);
		nl();
		return;
	}
	println("pvh: magic ok");
	puts("pvh: version ");
	put_dec(version);
	nl();
	if (version < 1) {
		println("pvh: bad version");
		return;
	}
	puts("pvh: cmdline ");
	println(cmdline());
	u32 entries = rd32(si + PVH_MEMMAP_ENTRIES);
	const u8 *map = phys(rd64(si + PVH_MEMMAP_PADDR));
	puts("pvh: memmap entries ");
	put_dec(entries);
	nl();
	for (u32 i = 0; i < entries && i < 128; i++) {
		const u8 *e = map + 24 * i; /* hvm_memmap_table_entry: addr, size, type, reserved */
		puts("pvh: memmap ");
		put_hex(rd64(e));
		putc(' ');
		put_hex(rd64(e + 8));
		putc(' ');
		put_dec(rd32(e + 16));
		nl();
	}
	puts("pvh: rsdp ");
	println(rd64(si + PVH_RSDP_PADDR) ? "yes" : "no");
}
