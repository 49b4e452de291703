/* Echoes each line the UART receives as `echo: <line>`; the line `quit` ends the guest. */
#include "rt.h"

void gmain(void *boot)
{
	static char line[8192];
	usize n = 0;
	int prev = 0;
	(void)boot;
	println("echo: ready");
	for (;;) {
		int c = getc();
		/* A terminal's Enter sends \r, a pipe \n; \r\n is one line end. */
		if (c == '\n' && prev == '\r') {
			prev = c;
			continue;
		}
		prev = c;
		if (c == '\r')
			c = '\n';
		if (c != '\n' && n < sizeof(line) - 1) {
			line[n++] = (char)c;
			continue;
		}
		line[n] = 0;
		puts("echo: ");
		println(line);
		if (streq(line, "quit"))
			return;
		n = 0;
		/* An overlong line is cut; the byte that did not fit starts the next one. */
		if (c != '\n')
			line[n++] = (char)c;
	}
}
