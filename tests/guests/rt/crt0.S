/* 64-bit entry (the ELF entry point): long mode, paging on, RSI = the Linux zero page. */
	.section .bss
	.balign 16
	.globl rt_stack_top
rt_stack:
	.skip 16384
rt_stack_top:

	.text
	.globl _start
_start:
	cli
	/* Our own stack: the VMM's boot stack sits in low memory we do not own. */
	movq $rt_stack_top, %rsp
	movq %rsi, rt_zero_page
	movq %rsi, %rdi
	call gmain
	call guest_exit
1:	hlt
	jmp 1b
