/* The null guest: its first serial output is the ready line, then it exits (exit=...). Nothing
 * else happens before the line, so benchmarks measure Ember, not the guest. */
#include "rt.h"

void gmain(void *boot)
{
	(void)boot;
	println("ember-guest: ready");
}
