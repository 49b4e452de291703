//! Opening a copy-on-write overlay from an arbitrary file (an overlay file comes from disk, so from
//! anyone): its header, map and length. The bytes go over a real overlay's first pages (XORed:
//! zeros keep them) or over nothing; with `seal` the target puts the magic and a valid header
//! checksum on them, so that inputs get past those checks to the fields and the map. Opening
//! must fail with an error or succeed, never panic; an overlay that opens serves a read of the
//! whole disk and a flush.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use ember_devices::virtio::block::{overlay, Direction, DiskImage};
use ember_devices::virtio::{DiskConfig, OverlayConfig};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 64;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Start from a real overlay's header and map page, made over the base.
    real: bool,
    seal: bool,
    /// Header fields written over the bytes: disk size, map length, data offset.
    fields: Option<(u64, u64, u64)>,
    /// The file's length, when it is to differ from the bytes' (the data area is sparse).
    len: Option<u32>,
    bytes: Vec<u8>,
}

fn base_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-base-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&p, bytes).unwrap();
        p
    })
}

/// The header and first map page of an overlay Ember made over the base, with block 0 written.
/// And the file's length.
fn real_overlay() -> &'static (Vec<u8>, u64) {
    static BYTES: OnceLock<(Vec<u8>, u64)> = OnceLock::new();
    BYTES.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-real-{}.ovl", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let disk = DiskImage::open(&DiskConfig {
            path: base_path().to_path_buf(),
            readonly: false,
            id: None,
            overlay: Some(OverlayConfig::File(p.clone())),
        })
        .unwrap();
        disk.write_zeroes(0, 512, false).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let mut bytes = std::fs::read(&p).unwrap();
        let len = bytes.len() as u64;
        bytes.truncate(8192);
        let _ = std::fs::remove_file(&p);
        (bytes, len)
    })
}

fuzz_target!(|input: Input| {
    let path = std::env::temp_dir().join(format!("ember-fuzz-{}.ovl", std::process::id()));
    let mut bytes = if input.real {
        let mut b = real_overlay().0.clone();
        for (x, y) in b.iter_mut().zip(&input.bytes) {
            *x ^= y;
        }
        b
    } else {
        input.bytes
    };
    if let Some((size, map_len, data_offset)) = input.fields {
        if bytes.len() < 48 {
            bytes.resize(48, 0);
        }
        bytes[16..24].copy_from_slice(&size.to_le_bytes());
        bytes[32..40].copy_from_slice(&map_len.to_le_bytes());
        bytes[40..48].copy_from_slice(&data_offset.to_le_bytes());
    }
    if input.seal {
        overlay::seal_header(&mut bytes);
    }
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&bytes, 0).unwrap();
    match (input.len, input.real) {
        (Some(len), _) => f.set_len(u64::from(len)).unwrap(),
        (None, true) => f.set_len(real_overlay().1).unwrap(),
        (None, false) => {}
    }
    drop(f);
    let opened = DiskImage::open(&DiskConfig {
        path: base_path().to_path_buf(),
        readonly: false,
        id: None,
        overlay: Some(OverlayConfig::File(path.clone())),
    });
    if let Ok(disk) = opened {
        assert_eq!(disk.sectors(), SECTORS);
        let mut buf = vec![0u8; (SECTORS * 512) as usize];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec is `buf`, alive and not otherwise borrowed for the call.
        let read = unsafe { disk.transfer(&mut iov, 0, Direction::ToGuest) };
        assert_eq!(read.ok(), Some(SECTORS * 512));
        disk.flush().unwrap();
    }
    let _ = std::fs::remove_file(&path);
});
