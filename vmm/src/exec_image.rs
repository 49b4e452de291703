//! The files `ember exec` boots with, made once and kept in the cache (`~/.cache/ember/exec`,
//! or `$EMBER_CACHE/exec`): the agent's initramfs (a newc cpio holding `ember-agent` as `/init`)
//! and, for `--rootfs DIR`, an ext4 image of the directory (`mkfs.ext4 -d`). Each is named by a
//! hash of what it is made from, so a changed agent or directory gets a new file and an unchanged
//! one is reused; files are written under a temporary name and renamed, so a run that is killed
//! halfway never leaves a broken one for the next.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot pack {} into an ext4 image: mkfs.ext4 {why}", dir.display())]
    Mkfs { dir: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("EMBER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/ember")
        });
    base.join("exec")
}

/// Writes `make`'s output to `path` unless it exists, through a temporary file and a rename.
fn cached(
    path: &Path,
    make: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let made = make(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path)));
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// One newc cpio entry (the initramfs format the kernel unpacks).
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        ino = 0,
        uid = 0,
        gid = 0,
        nlink = 1,
        mtime = 0,
        size = data.len(),
        maj = 0,
        min = 0,
        rmaj = 0,
        rmin = 0,
        namesize = name.len() + 1,
        check = 0,
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The initramfs with `agent` as `/init` and the directories it mounts on.
pub fn agent_initramfs(agent: &Path, cache: &Path) -> Result<PathBuf, ImageError> {
    let bytes = std::fs::read(agent).map_err(io_err(agent))?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    let path = cache.join(format!("agent-{:016x}.cpio", h.finish()));
    cached(&path, |tmp| {
        let mut cpio = Vec::with_capacity(bytes.len() + 4096);
        for dir in ["dev", "proc", "sys", "tmp", "newroot"] {
            cpio_entry(&mut cpio, dir, 0o040755, &[]);
        }
        cpio_entry(&mut cpio, "init", 0o100755, &bytes);
        cpio_entry(&mut cpio, "TRAILER!!!", 0, &[]);
        let mut f = std::fs::File::create(tmp).map_err(io_err(tmp))?;
        f.write_all(&cpio).map_err(io_err(tmp))
    })?;
    Ok(path)
}

/// What a directory tree is, for its image's name: every path with its type, mode, size and
/// modification time (a changed file changes one of them).
fn tree_hash(dir: &Path) -> Result<u64, ImageError> {
    let mut h = DefaultHasher::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(io_err(&d))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).map_err(io_err(&p))?;
            p.strip_prefix(dir).unwrap_or(&p).hash(&mut h);
            (meta.mode(), meta.size(), meta.mtime(), meta.mtime_nsec()).hash(&mut h);
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(h.finish())
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            }
            // Block-rounded, as ext4 stores them, plus an inode's worth per entry.
            total += meta.size().div_ceil(4096) * 4096 + 256;
        }
    }
    total
}

/// An ext4 image of `dir` (the command's root filesystem), made with `mkfs.ext4 -d`; room for
/// the files and as much again (at least 64 MiB), so the command can write (into its overlay).
pub fn rootfs_image(dir: &Path, cache: &Path) -> Result<PathBuf, ImageError> {
    let hash = tree_hash(dir)?;
    let path = cache.join(format!("rootfs-{hash:016x}.ext4"));
    cached(&path, |tmp| {
        let size = (dir_bytes(dir) * 2).max(64 << 20).next_multiple_of(1 << 20);
        let f = std::fs::File::create(tmp).map_err(io_err(tmp))?;
        f.set_len(size).map_err(io_err(tmp))?;
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(tmp)
            .output()
            .map_err(|e| ImageError::Mkfs {
                dir: dir.to_path_buf(),
                why: format!("could not run ({e}); install e2fsprogs"),
            })?;
        if !out.status.success() {
            return Err(ImageError::Mkfs {
                dir: dir.to_path_buf(),
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let mut perms = std::fs::metadata(tmp).map_err(io_err(tmp))?.permissions();
        // The base image is only ever read.
        perms.set_mode(0o444);
        std::fs::set_permissions(tmp, perms).map_err(io_err(tmp))
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ember-exec-image-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_initramfs_is_a_newc_archive_with_the_agent_as_init() {
        let dir = scratch("cpio");
        let agent = dir.join("agent");
        std::fs::write(&agent, b"\x7fELF pretend").unwrap();
        let cpio = agent_initramfs(&agent, &dir).unwrap();
        assert_eq!(agent_initramfs(&agent, &dir).unwrap(), cpio, "cached");
        let bytes = std::fs::read(&cpio).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.windows(5).any(|w| w == b"init\0"));
        assert!(bytes.windows(12).any(|w| w == b"\x7fELF pretend"));
        assert!(bytes.windows(11).any(|w| w == b"TRAILER!!!\0"));
        assert_eq!(bytes.len() % 4, 0);
        // cpio itself reads it back (the kernel's format is the same).
        let list = Command::new("cpio").args(["-it", "-F"]).arg(&cpio).output();
        if let Ok(list) = list {
            let names = String::from_utf8_lossy(&list.stdout);
            assert!(names.lines().any(|l| l == "init"), "{names}");
            assert!(names.lines().any(|l| l == "newroot"), "{names}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_becomes_an_ext4_image_named_by_its_contents() {
        let dir = scratch("rootfs");
        let cache = dir.join("cache");
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/greeting"), b"hello from the host\n").unwrap();
        let img = rootfs_image(&tree, &cache).unwrap();
        assert_eq!(
            rootfs_image(&tree, &cache).unwrap(),
            img,
            "unchanged: reused"
        );
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/greeting"])
            .arg(&img)
            .output()
            .expect("debugfs (e2fsprogs)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the host\n"
        );
        std::fs::write(
            tree.join("etc/greeting"),
            b"changed, and longer than before\n",
        )
        .unwrap();
        assert_ne!(
            rootfs_image(&tree, &cache).unwrap(),
            img,
            "changed: a new image"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
