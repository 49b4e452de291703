/* The echo guest with a PVH note, for VMMs that boot an ELF only through PVH (QEMU's microvm):
 * `ember bench` boots it to measure such a VMM's own memory in the null mode. */
#include "rt.h"

PVH_GUEST();

#include "echo.c"
