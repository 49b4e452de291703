/* Prints the zero page's E820 map, the RAM it adds up to, and where the highest RAM ends. */
#include "rt.h"

void gmain(void *boot)
{
	(void)boot;
	u32 n = zp_e820_entries();
	u64 total = 0, highest = 0;
	puts("e820 entries: ");
	put_dec(n);
	nl();
	for (u32 i = 0; i < n; i++) {
		struct e820_entry e = zp_e820(i);
		puts("e820: ");
		put_hex(e.addr);
		putc(' ');
		put_hex(e.size);
		putc(' ');
		put_dec(e.type);
		nl();
		if (e.type == 1) {
			total += e.size;
			if (e.addr + e.size > highest)
				highest = e.addr + e.size;
		}
	}
	puts("e820 ram total: ");
	put_dec(total);
	nl();
	puts("e820 highest: ");
	put_hex(highest);
	nl();
}
