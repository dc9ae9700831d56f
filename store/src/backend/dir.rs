//! The local directory back end: every object is a file under the store root.
//!
//! Puts write `tmp/<name>.<pid>.<seq>.tmp`, fsync it, and move it into place:
//! `rename` for [`PutMode::Overwrite`], `link` + unlink for [`PutMode::Create`]
//! (link fails when the name exists, so a concurrent writer's object is never
//! replaced). [`Backend::sync`] fsyncs the parent directories of the keys, batched,
//! so many chunk puts cost one directory fsync per prefix directory. Reads open
//! files with `O_NOFOLLOW | O_NONBLOCK` and accept only regular files: a store
//! directory is untrusted, a planted symlink or FIFO must not redirect or hang a read.

use super::{Backend, ObjectMeta, Put, PutMode, ReadClass};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest buffer reserved up front from a file's length (a store file is
/// untrusted: an absurd length must not become an absurd allocation).
const PREALLOC_LIMIT: usize = 64 << 20;

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    /// The store at `root` (which must exist).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirBackend { root: root.into() }
    }

    /// The file of `key`. Keys are built by this crate from validated names; a key
    /// never holds `..` or a leading `/`.
    pub fn path(&self, key: &str) -> PathBuf {
        debug_assert!(!key.starts_with('/') && !key.split('/').any(|c| c == ".."));
        self.root.join(key)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Open `key`'s file for reading: never through a symlink, never blocking on a
    /// FIFO planted in its place, and only a regular file. `Ok(None)`: it does not exist.
    fn open(&self, key: &str) -> Result<Option<(File, PathBuf, fs::Metadata)>> {
        let path = self.path(key);
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::BadObject(format!(
                    "{}: its file is a symlink",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let m = f.metadata().at(&path)?;
        if !m.file_type().is_file() {
            return Err(Error::BadObject(format!(
                "{}: its file is not a regular file",
                path.display()
            )));
        }
        Ok(Some((f, path, m)))
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            if !dir.is_dir() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .at(dir)?;
                if let Some(up) = dir.parent() {
                    fsutil::fsync_dir(up)?;
                }
            }
        }
        Ok(())
    }
}

fn mtime(m: &fs::Metadata) -> i64 {
    m.mtime()
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn get(&self, key: &str, limit: u64, _class: ReadClass) -> Result<Option<Vec<u8>>> {
        let Some((f, path, m)) = self.open(key)? else {
            return Ok(None);
        };
        let too_large = |len: u64| {
            Error::BadObject(format!(
                "{}: its file has {len} bytes, more than a valid one can ({limit})",
                path.display()
            ))
        };
        if m.len() > limit {
            return Err(too_large(m.len()));
        }
        // Sized from the file's length: one allocation instead of a doubling series;
        // the read stops one byte past the limit in case the file grew meanwhile.
        let mut buf = Vec::with_capacity((m.len() as usize).min(PREALLOC_LIMIT));
        io::Read::read_to_end(&mut io::Read::take(f, limit + 1), &mut buf).at(&path)?;
        if buf.len() as u64 > limit {
            return Err(too_large(buf.len() as u64));
        }
        Ok(Some(buf))
    }

    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
        _class: ReadClass,
    ) -> Result<Option<Vec<u8>>> {
        let Some((f, path, m)) = self.open(key)? else {
            return Ok(None);
        };
        let avail = m.len().saturating_sub(offset);
        let mut buf = vec![0u8; (len as u64).min(avail) as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        buf.truncate(done);
        Ok(Some(buf))
    }

    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<Put> {
        let dest = self.path(key);
        self.ensure_parent(&dest)?;
        let tag: String = key
            .rsplit('/')
            .next()
            .unwrap_or("obj")
            .chars()
            .take(16)
            .collect();
        let tmp = fsutil::temp_path(&self.tmp_dir(), &tag);
        match mode {
            PutMode::Overwrite => {
                fsutil::write_atomic_nosync_dir(&tmp, &dest, bytes, 0o644)?;
                Ok(Put::Written)
            }
            PutMode::Create => {
                if fs::symlink_metadata(&dest).is_ok() {
                    return Ok(Put::Existed);
                }
                let res = (|| {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&tmp)?;
                    io::Write::write_all(&mut f, bytes)?;
                    f.sync_all()?;
                    match fs::hard_link(&tmp, &dest) {
                        // The parent went meanwhile (forget removes an emptied series
                        // directory): make it again, once.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            self.ensure_parent(&dest).map_err(io::Error::other)?;
                            fs::hard_link(&tmp, &dest)
                        }
                        other => other,
                    }
                })();
                let _ = fs::remove_file(&tmp);
                match res {
                    Ok(()) => Ok(Put::Written),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Put::Existed),
                    Err(e) => Err(Error::io(&dest, e)),
                }
            }
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // Walk the directory the prefix names (prefixes are directory-like here).
        let base = prefix.trim_end_matches('/');
        let mut out = Vec::new();
        let mut stack = vec![base.to_string()];
        while let Some(rel) = stack.pop() {
            let dir = self.path(&rel);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&dir, e)),
            };
            for e in rd {
                let e = e.at(&dir)?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let ft = e.file_type().at(e.path())?;
                if ft.is_dir() {
                    stack.push(key);
                } else if ft.is_file() {
                    // A file removed between readdir and stat is simply not listed.
                    if let Ok(m) = e.metadata() {
                        out.push(ObjectMeta {
                            key,
                            size: m.len(),
                            modified: mtime(&m),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: mtime(&m),
            })),
            Ok(_) => Err(Error::BadObject(format!(
                "{}: not a regular file",
                path.display()
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn sync(&self, keys: &[String]) -> Result<()> {
        let mut dirs: Vec<PathBuf> = keys
            .iter()
            .filter_map(|k| self.path(k).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        for d in dirs {
            match fsutil::fsync_dir(&d) {
                Ok(()) => {}
                // A directory that a delete emptied and someone removed: nothing to sync.
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{chunk_key, BackendChunks, ChunkSource};
    use crate::format::chunk::ChunkId;
    use std::sync::Arc;

    fn source() -> (tempfile::TempDir, DirBackend, BackendChunks, ChunkId) {
        let d = tempfile::tempdir().unwrap();
        let b = DirBackend::new(d.path());
        fs::create_dir_all(d.path().join("tmp")).unwrap();
        let id = ChunkId([0xab; 32]);
        fs::create_dir_all(b.path(&chunk_key(&id)).parent().unwrap()).unwrap();
        let chunks = BackendChunks::new(Arc::new(b.clone()));
        (d, b, chunks, id)
    }

    #[test]
    fn a_fifo_a_symlink_and_an_oversized_file_are_errors_naming_the_chunk() {
        let (d, b, src, id) = source();
        let path = b.path(&chunk_key(&id));
        // A symlink to a device that would read forever.
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let e = src.read_all(&id, 1 << 20).unwrap_err().to_string();
        assert!(e.contains(&id.to_hex()) && e.contains("symlink"), "{e}");
        fs::remove_file(&path).unwrap();
        // A FIFO nobody writes: the open must not block.
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = src.read_range(&id, 0, 64).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        fs::remove_file(&path).unwrap();
        // A file longer than any valid chunk of the expected size.
        fs::write(&path, vec![0u8; 5000]).unwrap();
        let e = src.read_all(&id, 4096).unwrap_err().to_string();
        assert!(
            e.contains("more than a valid") && e.contains(&id.to_hex()),
            "{e}"
        );
        assert_eq!(src.read_all(&id, 5000).unwrap().len(), 5000);
        // A range past the end is short, not a huge zeroed buffer.
        assert_eq!(src.read_range(&id, 4990, 1 << 30).unwrap().len(), 10);
        drop(d);
    }

    #[test]
    fn create_never_replaces_and_list_finds_nested_keys() {
        let (_d, b, _src, _id) = source();
        assert_eq!(
            b.put("snapshots/a/1.fidx", b"one", PutMode::Create)
                .unwrap(),
            Put::Written
        );
        assert_eq!(
            b.put("snapshots/a/1.fidx", b"two", PutMode::Create)
                .unwrap(),
            Put::Existed
        );
        assert_eq!(
            b.get("snapshots/a/1.fidx", 10, ReadClass::Demand).unwrap(),
            Some(b"one".to_vec())
        );
        b.put("snapshots/b/2.fidx", b"x", PutMode::Overwrite)
            .unwrap();
        let mut keys: Vec<String> = b
            .list("snapshots/")
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort();
        assert_eq!(keys, ["snapshots/a/1.fidx", "snapshots/b/2.fidx"]);
        b.delete("snapshots/b/2.fidx").unwrap();
        b.delete("snapshots/b/2.fidx").unwrap();
        assert!(b.head("snapshots/b/2.fidx").unwrap().is_none());
        // No temp file is left behind.
        assert_eq!(fs::read_dir(b.tmp_dir()).unwrap().count(), 0);
    }
}
