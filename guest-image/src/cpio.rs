//! A writer for the cpio "newc" format (`070701`), the format the Linux kernel unpacks
//! as an initramfs. Entries are written exactly as given; callers order them (parents
//! before children) and pick fixed metadata for reproducible output.

use std::io::{self, Write};

use thiserror::Error;

/// `S_IFDIR` and friends, as the kernel reads them from a newc header.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
/// The largest file a newc header can describe (its size field has 8 hex digits).
const MAX_FILE_SIZE: usize = u32::MAX as usize;

/// Errors of the cpio writer.
#[derive(Debug, Error)]
pub enum CpioError {
    /// The underlying writer failed.
    #[error("cannot write the cpio archive")]
    Write(#[source] io::Error),
    /// A name that cannot be stored: empty, absolute, with `..`, NUL or empty components.
    #[error("invalid cpio entry name {0:?}")]
    BadName(String),
    /// File data larger than newc's 32-bit size field.
    #[error("cpio entry {name} is too large ({size} bytes)")]
    TooLarge {
        /// Entry name.
        name: String,
        /// Its size.
        size: usize,
    },
}

/// Metadata of one entry; `mode` includes the file type bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// File type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u32,
}

/// Writes newc entries to `W`, numbering inodes from 1 in the order written.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(CpioError::BadName(name.to_owned()));
    }
    Ok(())
}

fn pad4(len: u64) -> usize {
    ((4 - (len % 4)) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// A writer that appends to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// A directory.
    pub fn directory(&mut self, name: &str, meta: Meta) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(
            name,
            Meta {
                mode: S_IFDIR | (meta.mode & 0o7777),
                ..meta
            },
            2,
            (0, 0),
            &[],
        )
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, meta: Meta, data: &[u8]) -> Result<(), CpioError> {
        check_name(name)?;
        self.entry(
            name,
            Meta {
                mode: S_IFREG | (meta.mode & 0o7777),
                ..meta
            },
            1,
            (0, 0),
            data,
        )
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, meta: Meta, target: &str) -> Result<(), CpioError> {
        check_name(name)?;
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::BadName(target.to_owned()));
        }
        let meta = Meta {
            mode: S_IFLNK | 0o777,
            ..meta
        };
        self.entry(name, meta, 1, (0, 0), target.as_bytes())
    }

    /// A character device node `major:minor`.
    pub fn char_device(
        &mut self,
        name: &str,
        meta: Meta,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        check_name(name)?;
        let meta = Meta {
            mode: S_IFCHR | (meta.mode & 0o7777),
            ..meta
        };
        self.entry(name, meta, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let meta = Meta {
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        self.header(TRAILER, 0, meta, 1, (0, 0), 0)?;
        self.name_and_padding(TRAILER)?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        meta: Meta,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        if data.len() > MAX_FILE_SIZE {
            return Err(CpioError::TooLarge {
                name: name.to_owned(),
                size: data.len(),
            });
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.header(name, ino, meta, nlink, rdev, data.len() as u32)?;
        self.name_and_padding(name)?;
        self.write(data)?;
        self.write(&[0u8; 3][..pad4(data.len() as u64)])
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        meta: Meta,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
    ) -> Result<(), CpioError> {
        let fields = [
            ino,
            meta.mode,
            meta.uid,
            meta.gid,
            nlink,
            meta.mtime,
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())
    }

    fn name_and_padding(&mut self, name: &str) -> Result<(), CpioError> {
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        let pad = pad4(self.offset);
        self.write(&[0u8; 3][..pad])
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes).map_err(CpioError::Write)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod reader {
    //! A small newc reader for tests: parses what the writer produced and checks the
    //! layout rules (magic, hex fields, 4-byte alignment, trailer last).

    /// One parsed entry.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Entry {
        pub(crate) offset: usize,
        pub(crate) name: String,
        pub(crate) ino: u32,
        pub(crate) mode: u32,
        pub(crate) uid: u32,
        pub(crate) gid: u32,
        pub(crate) nlink: u32,
        pub(crate) mtime: u32,
        pub(crate) rdev: (u32, u32),
        pub(crate) check: u32,
        pub(crate) data: Vec<u8>,
    }

    fn field(archive: &[u8], at: usize) -> Result<u32, String> {
        let raw = archive.get(at..at + 8).ok_or("truncated header")?;
        let text = std::str::from_utf8(raw).map_err(|_| "non-ascii header")?;
        u32::from_str_radix(text, 16).map_err(|_| format!("bad hex field {text:?}"))
    }

    /// All entries up to and including the trailer; errors on any layout violation.
    pub(crate) fn parse(archive: &[u8]) -> Result<Vec<Entry>, String> {
        let mut entries = Vec::new();
        let mut at = 0usize;
        loop {
            if at % 4 != 0 {
                return Err(format!("header at {at} is not 4-byte aligned"));
            }
            if archive.get(at..at + 6) != Some(b"070701".as_slice()) {
                return Err(format!("bad magic at {at}"));
            }
            let f = |i: usize| field(archive, at + 6 + i * 8);
            let namesize = f(11)? as usize;
            let size = f(6)? as usize;
            let name_start = at + 110;
            let name_bytes = archive
                .get(name_start..name_start + namesize)
                .ok_or("truncated name")?;
            if name_bytes.last() != Some(&0) {
                return Err("name is not NUL-terminated".into());
            }
            let name = String::from_utf8(name_bytes[..namesize - 1].to_vec())
                .map_err(|_| "non-utf8 name")?;
            let data_start = (name_start + namesize).next_multiple_of(4);
            if archive[name_start + namesize..data_start]
                .iter()
                .any(|b| *b != 0)
            {
                return Err("non-zero name padding".into());
            }
            let data = archive
                .get(data_start..data_start + size)
                .ok_or("truncated data")?
                .to_vec();
            let entry = Entry {
                offset: at,
                name,
                ino: f(0)?,
                mode: f(1)?,
                uid: f(2)?,
                gid: f(3)?,
                nlink: f(4)?,
                mtime: f(5)?,
                rdev: (f(9)?, f(10)?),
                check: f(12)?,
                data,
            };
            at = (data_start + size).next_multiple_of(4);
            let is_trailer = entry.name == "TRAILER!!!";
            entries.push(entry);
            if is_trailer {
                if archive.len() != at {
                    return Err(format!("{} bytes after the trailer", archive.len() - at));
                }
                return Ok(entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reader::parse;
    use super::*;

    const META: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };

    fn archive(build: impl FnOnce(&mut CpioWriter<Vec<u8>>)) -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        build(&mut writer);
        writer.finish().unwrap_or_default()
    }

    #[test]
    fn file_round_trips_with_header_fields() {
        let bytes = archive(|w| {
            w.file(
                "etc/motd",
                Meta {
                    mode: 0o644,
                    uid: 7,
                    gid: 8,
                    mtime: 9,
                },
                b"hello",
            )
            .unwrap_or(())
        });

        let entries = parse(&bytes).unwrap_or_default();

        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "etc/motd");
        assert_eq!(entries[0].mode, S_IFREG | 0o644);
        assert_eq!(
            (entries[0].uid, entries[0].gid, entries[0].mtime),
            (7, 8, 9)
        );
        assert_eq!(
            (entries[0].ino, entries[0].nlink, entries[0].check),
            (1, 1, 0)
        );
        assert_eq!(entries[0].data, b"hello");
    }

    #[test]
    fn every_header_is_aligned_and_trailer_is_last() {
        let bytes = archive(|w| {
            for (i, name) in ["a", "ab", "abc", "abcd", "abcde"].iter().enumerate() {
                w.file(name, META, &vec![b'x'; i]).unwrap_or(());
            }
        });

        let entries = parse(&bytes).unwrap_or_default();

        assert_eq!(entries.len(), 6);
        assert!(entries.iter().all(|e| e.offset % 4 == 0));
        assert_eq!(entries[5].name, "TRAILER!!!");
        assert_eq!(entries[5].mode, 0);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn directory_symlink_and_device_have_their_types() {
        let bytes = archive(|w| {
            w.directory("dev", META).unwrap_or(());
            w.char_device(
                "dev/console",
                Meta {
                    mode: 0o600,
                    ..META
                },
                5,
                1,
            )
            .unwrap_or(());
            w.symlink("bin/sh", META, "/bin/busybox").unwrap_or(());
        });

        let entries = parse(&bytes).unwrap_or_default();

        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].mode, S_IFCHR | 0o600);
        assert_eq!(entries[1].rdev, (5, 1));
        assert_eq!(entries[2].mode, S_IFLNK | 0o777);
        assert_eq!(entries[2].data, b"/bin/busybox");
        assert_eq!(
            entries.iter().map(|e| e.ino).collect::<Vec<_>>(),
            [1, 2, 3, 0]
        );
    }

    #[test]
    fn mode_argument_cannot_change_the_file_type() {
        let bytes = archive(|w| {
            w.file(
                "x",
                Meta {
                    mode: S_IFCHR | 0o644,
                    ..META
                },
                b"",
            )
            .unwrap_or(())
        });

        let entries = parse(&bytes).unwrap_or_default();

        assert_eq!(entries[0].mode, S_IFREG | 0o644);
    }

    #[test]
    fn bad_names_are_refused() {
        let mut writer = CpioWriter::new(Vec::new());

        let results = ["", "/abs", "a/../b", "a//b", "a/./b", "nul\0"]
            .map(|name| writer.file(name, META, b""));

        assert!(results
            .iter()
            .all(|r| matches!(r, Err(CpioError::BadName(_)))));
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let bytes = archive(|_| {});

        let entries = parse(&bytes).unwrap_or_default();

        assert_eq!(entries.len(), 1);
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len(), 124);
    }
}
