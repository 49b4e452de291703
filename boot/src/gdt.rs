//! The boot GDT: flat segments for the entry mode, encoded as the Intel SDM vol. 3A section 3.4.5
//! ("Segment Descriptors") describes them, and the matching `kvm_segment`s the vCPU is loaded with
//! (a segment register's hidden part must agree with the descriptor the guest may reload).

use kvm_bindings::kvm_segment;

/// Access byte and flags nibble, as `0xF0AA`: G, D/B, L, AVL in the top nibble, then the access
/// byte (P, DPL, S, type).
pub const CODE64: u16 = 0xa09b;
pub const CODE32: u16 = 0xc09b;
pub const DATA: u16 = 0xc093;
/// A busy 64-bit (or 32-bit) TSS: VM entry requires TR to hold one.
pub const TSS64: u16 = 0x808b;
pub const TSS32: u16 = 0x008b;

/// Descriptor indices, shared by both entry modes.
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// A segment descriptor from its flags, base and (20-bit) limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The segment register contents a load of `descriptor` at `index` produces.
pub fn segment(index: u16, descriptor: u64) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let base = ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present,
        dpl: ((descriptor >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The four-entry table (null, code, data, TSS) for a 64-bit or a 32-bit entry.
pub fn table(long_mode: bool) -> [u64; 4] {
    if long_mode {
        [
            0,
            descriptor(CODE64, 0, 0xfffff),
            descriptor(DATA, 0, 0xfffff),
            descriptor(TSS64, 0, 0xfffff),
        ]
    } else {
        // PVH: flat 4 GiB code and data, and a 32-bit TSS with limit 0x67.
        [
            0,
            descriptor(CODE32, 0, 0xfffff),
            descriptor(DATA, 0, 0xfffff),
            descriptor(TSS32, 0, 0x67),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode_ring0() {
        let s = segment(CODE_INDEX, descriptor(CODE64, 0, 0xfffff));
        assert_eq!(
            (s.l, s.db, s.dpl, s.present, s.s, s.type_),
            (1, 0, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 8);
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let d = descriptor(TSS32, 0x1234_5678, 0x67);
        let s = segment(TSS_INDEX, d);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x67);
        assert_eq!(s.g, 0);
        assert_eq!(s.type_, 0xb);
    }
}
