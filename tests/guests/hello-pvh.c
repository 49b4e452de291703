/* The null guest with a PVH note: the same program as hello.c, for VMMs that boot an ELF only
 * through PVH (QEMU's microvm machine), so `ember bench` can compare them in the null mode. */
#include "rt.h"

PVH_GUEST();

#include "hello.c"
