/* The shared runtime of Ember's freestanding test guests: serial I/O, printing, the command line,
 * boot information (Linux zero page or PVH start_info), ACPI table lookup and the three ways a
 * guest can end (i8042 reset, triple fault, ACPI S5 poweroff). */
#ifndef EMBER_GUEST_RT_H
#define EMBER_GUEST_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long usize;

/* Every guest defines this. `boot` is the zero page (64-bit entry) or hvm_start_info (PVH). */
void gmain(void *boot);

/* Port I/O. */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Unaligned little-endian reads of guest memory (tables are packed; x86 allows unaligned loads). */
typedef u16 __attribute__((aligned(1), may_alias)) u16_unaligned;
typedef u32 __attribute__((aligned(1), may_alias)) u32_unaligned;
typedef u64 __attribute__((aligned(1), may_alias)) u64_unaligned;
static inline u8 rd8(const void *p) { return *(const volatile u8 *)p; }
static inline u16 rd16(const void *p) { return *(const volatile u16_unaligned *)p; }
static inline u32 rd32(const void *p) { return *(const volatile u32_unaligned *)p; }
static inline u64 rd64(const void *p) { return *(const volatile u64_unaligned *)p; }
static inline const u8 *phys(u64 addr) { return (const u8 *)addr; }

/* libc bits the compiler may emit calls to. */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int streq(const char *a, const char *b);

/* COM1 (16550). */
#define COM1 0x3f8
void putc(char c);
void putn(const char *s, usize n);
/* putn without waiting for room in the transmit FIFO, as one string OUT: for a VMM's UART, which
 * takes bytes as fast as they come (the null guest's ready line). Inline: no call to emulate. */
static inline void putn_unpaced(const char *s, usize n)
{
	__asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)COM1) : "memory");
}
void put_hex(u64 v);      /* 0x-prefixed */
void put_dec(u64 v);
void nl(void);
/* Inline so that a literal's length is known at compile time: where a VMM emulates the guest's
 * kernel code (kvm_pvm), each instruction of a strlen loop costs ~1.5 us before the text goes out. */
static inline void puts(const char *s) { putn(s, __builtin_strlen(s)); } /* no newline */
static inline void println(const char *s)
{
	puts(s);
	nl();
}
int getc(void); /* blocks until a byte arrives */

/* Boot information. Exactly one of these is non-null once gmain runs. */
extern const u8 *rt_zero_page;
extern const u8 *rt_pvh_info;

/* The kernel command line ("" when there is none). */
const char *cmdline(void);
/* The value of the first `key` word on the command line (key includes the '=', e.g. "exit="),
 * copied into a static buffer; null when absent. */
const char *param(const char *key);

/* Linux zero page (struct boot_params) fields. */
#define ZP_ACPI_RSDP_ADDR 0x070
#define ZP_EXT_CMD_LINE_PTR 0x0c8
#define ZP_E820_ENTRIES 0x1e8
#define ZP_RAMDISK_IMAGE 0x218
#define ZP_RAMDISK_SIZE 0x21c
#define ZP_CMD_LINE_PTR 0x228
#define ZP_E820_TABLE 0x2d0
#define E820_MAX_ENTRIES 128
struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
};
u32 zp_e820_entries(void);
struct e820_entry zp_e820(u32 i);
u64 zp_rsdp(void);
u64 zp_ramdisk_image(void);
u32 zp_ramdisk_size(void);

/* PVH hvm_start_info. */
#define PVH_MAGIC 0x336ec578u
#define PVH_CMDLINE_PADDR 24
#define PVH_RSDP_PADDR 32
#define PVH_MEMMAP_PADDR 40
#define PVH_MEMMAP_ENTRIES 48
/* Emits the PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY) naming the runtime's 32-bit entry. Put it at
 * file scope in a guest that wants to be booted the PVH way. The descriptor is 8 bytes like
 * Linux's, so a loader reading either a u32 or a u64 gets the address. */
#define PVH_GUEST()                                                                               \
	__asm__(".pushsection .note.Xen, \"a\", @note\n"                                          \
		".balign 4\n"                                                                     \
		".long 4, 8, 18\n"                                                                \
		".asciz \"Xen\"\n"                                                                \
		".balign 4\n"                                                                     \
		".quad pvh_start32\n"                                                             \
		".popsection\n")

/* ACPI. */
int checksum_ok(const void *p, usize len);
/* The RSDP: the zero page's acpi_rsdp_addr, PVH's rsdp_paddr, else a scan of 0xe0000-0xfffff. */
const u8 *acpi_rsdp(void);
/* The `i`th table the XSDT (or RSDT) lists, null past the end. */
const u8 *acpi_table_at(u32 i);
/* The first table with signature `sig` (the DSDT too, through the FADT); null when absent. */
const u8 *acpi_find(const char *sig);

/* Ending the guest. guest_exit() picks one by the command line's `exit=i8042|triple|acpi`
 * (default i8042). Each prints `exit: <how>` first; when the VMM ignores the request, it says so
 * (`exit: ... ignored` or `exit: ... failed: ...`) and falls back to the i8042 reset, so a test can
 * tell a missing exit path from a working one without waiting for a deadline. */
__attribute__((noreturn)) void guest_exit(void);
__attribute__((noreturn)) void exit_i8042(void);
__attribute__((noreturn)) void exit_triple(void);
__attribute__((noreturn)) void exit_acpi(void);
__attribute__((noreturn)) void exit_pvpanic(void);

#endif
