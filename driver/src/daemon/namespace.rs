//! The daemon's own mount namespace (libublk's advice: a file system mounted on our
//! own device must not be in the daemon's namespace).

/// Put the daemon in its own mount namespace with private propagation, so a file
/// system mounted on its device elsewhere can never deadlock its exit.
pub fn private_mount_namespace() {
    // SAFETY: unshare/mount with constant, valid arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            let root = c"/";
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            detach_ublk_mounts();
        } else {
            eprintln!("livemount: warning: cannot create a private mount namespace; do not mount the device in this process's namespace");
        }
    }
}

/// In the daemon's fresh namespace, lazily unmount every file system on a ublk device
/// that the copy of the caller's namespace brought along (e.g. `mount --recover` while
/// the device's ext4 is mounted): holding them would keep their superblocks alive after
/// the user unmounts them, and their final write-back would then target a device whose
/// daemon is this process.
fn detach_ublk_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let unescape = |s: &str| -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    };
    let targets: Vec<Vec<u8>> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let source = right.split(' ').nth(1)?;
            let point = left.split(' ').nth(4)?;
            source.starts_with("/dev/ublkb").then(|| unescape(point))
        })
        .collect();
    for t in targets.into_iter().rev() {
        if let Ok(c) = std::ffi::CString::new(t) {
            // SAFETY: valid C string; affects only this process's private namespace.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
