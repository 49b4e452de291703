/* Prints numbered lines without end, as a chatty guest does: for the tests where nobody reads
 * Ember's output and Ember must still stop promptly. */
#include "rt.h"

void gmain(void *boot)
{
	(void)boot;
	println("flood: ready");
	for (u64 n = 0;; n++) {
		puts("flood: line ");
		put_hex(n);
		nl();
	}
}
