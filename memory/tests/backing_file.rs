//! The `file:PATH` backend never destroys what it did not create.
//! No KVM needed.

use memory::{GIB, MIB};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use memory::{Backend, Error, GuestAddress, HotplugLayout, HotplugRegion};

fn layout() -> HotplugLayout {
    HotplugLayout {
        base: GuestAddress(4 * GIB),
        size: 64 * MIB,
        block_size: 2 * MIB,
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "tide-backing-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(path: &Path) -> memory::Result<HotplugRegion> {
    HotplugRegion::new(&layout(), Backend::File(path.to_path_buf()))
}

fn refused(r: memory::Result<HotplugRegion>, want: &str) -> String {
    match r {
        Err(e @ Error::BackingFileRefused { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
            msg
        }
        other => panic!("expected a refusal ({want}), got {other:?}"),
    }
}

#[test]
fn existing_regular_file_is_refused_and_left_intact() {
    let d = Dir::new("existing");
    let p = d.0.join("precious");
    std::fs::write(&p, b"the user's data").unwrap();
    refused(open(&p), "already exists");
    assert_eq!(std::fs::read(&p).unwrap(), b"the user's data");
}

#[test]
fn symlink_is_refused_and_its_target_left_intact() {
    let d = Dir::new("symlink");
    let target = d.0.join("target");
    std::fs::write(&target, b"keep me").unwrap();
    let link = d.0.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(open(&link), "symbolic link");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // A dangling link is refused too: nothing is created at its target.
    let dangling = d.0.join("dangling");
    std::os::unix::fs::symlink(d.0.join("nowhere"), &dangling).unwrap();
    refused(open(&dangling), "symbolic link");
    assert!(!d.0.join("nowhere").exists());
}

#[test]
fn fifo_and_device_nodes_are_refused_without_blocking() {
    let d = Dir::new("fifo");
    let fifo = d.0.join("fifo");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    refused(open(&fifo), "FIFO");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // /dev/null: refused, still there and still a character device.
    refused(open(Path::new("/dev/null")), "device node");
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn new_path_is_created_and_removed_at_the_end() {
    let d = Dir::new("new");
    let p = d.0.join("guest-ram");
    {
        let r = open(&p).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 64 * MIB);
        assert_eq!(md.mode() & 0o777, 0o600);
        r.populate(GuestAddress(4 * GIB), 4 * MIB).unwrap();
        // fd backends: resident bytes from fstat blocks.
        assert!(r.resident_bytes_is_cheap());
        assert!(r.resident_bytes().unwrap() >= 4 * MIB);
    }
    assert!(!p.exists());
}

#[test]
fn a_replaced_path_is_not_removed() {
    let d = Dir::new("replaced");
    let p = d.0.join("guest-ram");
    let r = open(&p).unwrap();
    std::fs::rename(&p, d.0.join("moved")).unwrap();
    std::fs::write(&p, b"someone else's").unwrap();
    drop(r);
    assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
}

#[test]
fn directory_gets_an_unnamed_file() {
    let d = Dir::new("dir");
    {
        let r = open(&d.0).unwrap();
        r.populate(GuestAddress(4 * GIB), 2 * MIB).unwrap();
        assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 0);
    }
    assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 0);
    assert!(d.0.is_dir());
}

#[test]
fn second_user_of_a_file_is_refused_and_the_first_keeps_it() {
    let d = Dir::new("twice");
    let p = d.0.join("guest-ram");
    let first = open(&p).unwrap();
    first.populate(GuestAddress(4 * GIB), 2 * MIB).unwrap();
    let ino = std::fs::metadata(&p).unwrap().ino();
    let msg = refused(open(&p), "in use by another Tide");
    println!("second open: {msg}");
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!((md.ino(), md.len()), (ino, 64 * MIB));
    assert!(first.resident_bytes().unwrap() >= 2 * MIB, "not truncated");
    drop(first);
    assert!(!p.exists());
}
