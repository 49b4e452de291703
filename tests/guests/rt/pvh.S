/* PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info. Goes to long mode with
 * static page tables identity-mapping the first 4 GiB in 2 MiB pages (built by the assembler, so
 * nothing to fill at run time), then runs gmain like the 64-bit entry. */
	.section .data
	.balign 4096
pvh_pml4:
	.quad pvh_pdpt + 0x3
	.fill 511, 8, 0
pvh_pdpt:
	.quad pvh_pd + 0x0003
	.quad pvh_pd + 0x1003
	.quad pvh_pd + 0x2003
	.quad pvh_pd + 0x3003
	.fill 508, 8, 0
pvh_pd:
	.set pg, 0
	.rept 2048
	.quad (pg << 21) | 0x83 /* present, writable, 2 MiB */
	.set pg, pg + 1
	.endr

	.balign 8
pvh_gdt:
	.quad 0
	.quad 0x00af9b000000ffff /* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff /* 0x10: data */
pvh_gdt_end:
pvh_gdt_desc:
	.word pvh_gdt_end - pvh_gdt - 1
	.long pvh_gdt

	.section .text32, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	movl %ebx, rt_pvh_info
	lgdt pvh_gdt_desc
	movl %cr4, %eax
	orl $0x20, %eax /* PAE */
	movl %eax, %cr4
	movl $pvh_pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx /* EFER */
	rdmsr
	orl $0x100, %eax /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax /* PG, PE */
	movl %eax, %cr0
	ljmp $0x08, $pvh_start64

	.text
	.code64
pvh_start64:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq $rt_stack_top, %rsp
	movl rt_pvh_info, %edi
	call gmain
	call guest_exit
1:	hlt
	jmp 1b
