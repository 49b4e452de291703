/* Writes a line to the UART with one `rep outsb` (a string OUT: one exit, many bytes), as some
 * boot loaders and early consoles do, then a second line the usual way, and exits. */
#include "rt.h"

void gmain(void *boot)
{
	static const char line[] = "outsb: this line came in one rep outsb\n";
	const char *p = line;
	u64 n = sizeof(line) - 1;
	(void)boot;
	__asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((u16)0x3f8) : "memory");
	println("outsb: done");
}
