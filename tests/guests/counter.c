/* Keeps its state only in RAM: a nonce drawn at boot (from the TSC) and a counter printed with
 * each line, `counter: nonce=0x... n=N`, about every `counter.tsc=` TSC ticks (default 2^24).
 * Between lines it polls the UART: `q` ends the guest, any other byte is answered with
 * `counter: got <byte>`. A VMM that pauses and resumes it, or restores it elsewhere, must give
 * back the same nonce and a count that goes on without a gap. */
#include "rt.h"

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

#define COM1_LSR 0x3fd
#define LSR_DATA_READY 0x01

static u64 parse_u64(const char *s, u64 fallback)
{
	u64 v = 0;
	if (!s || !*s)
		return fallback;
	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (u64)(*s - '0');
	return v ? v : fallback;
}

void gmain(void *boot)
{
	(void)boot;
	u64 period = parse_u64(param("counter.tsc="), 1ul << 24);
	/* Any bits will do, as long as they differ between boots and live only in RAM. */
	u64 nonce = (rdtsc() * 0x9e3779b97f4a7c15ul) ^ 0x5eed;
	println("counter: ready");
	for (u64 n = 0;; n++) {
		puts("counter: nonce=");
		put_hex(nonce);
		puts(" n=");
		put_dec(n);
		nl();
		u64 start = rdtsc();
		while (rdtsc() - start < period) {
			if (!(inb(COM1_LSR) & LSR_DATA_READY))
				continue;
			int c = getc();
			if (c == 'q') {
				println("counter: quit");
				return;
			}
			puts("counter: got ");
			putc((char)c);
			nl();
		}
	}
}
