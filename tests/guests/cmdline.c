/* Prints the kernel command line as the guest received it. */
#include "rt.h"

void gmain(void *boot)
{
	(void)boot;
	puts("cmdline: ");
	println(cmdline());
}
