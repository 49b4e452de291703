/* The null guest: its first serial output is the ready line, then it exits (exit=...). Nothing
 * else happens before the line, so benchmarks measure Ember, not the guest. */
#include "rt.h"

void gmain(void *boot)
{
	static const char line[] = "ember-guest: ready\n";

	(void)boot;
	/* As the floor's guest writes its own line. putn waits for room in the transmit FIFO as a
	 * 16550A driver does, which costs four more exits and ~30 more emulated instructions on
	 * kvm_pvm before the line. */
	putn_unpaced(line, sizeof line - 1);
}
