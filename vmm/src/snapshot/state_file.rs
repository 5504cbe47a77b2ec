//! The state file: a fixed header, then the machine state as postcard bytes.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "ZYGOTEVM"
//!      8     4  format version (little endian), independent of the crate version
//!     12     4  flags (0)
//!     16     8  payload length
//!     24     4  CRC-32 of the payload
//!     28     4  reserved (0)
//!     32     …  payload
//! ```
//! A file that is too large, truncated, of another version, or whose payload does
//! not match its checksum is refused before anything is decoded.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"ZYGOTEVM";
/// The format this build writes and reads. Bump it when a saved struct changes.
pub const STATE_VERSION: u32 = 3;
/// The largest payload accepted (a state file is a few KiB per vCPU).
pub const STATE_MAX_LEN: u64 = 16 << 20;
const HEADER_LEN: usize = 32;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read or written.
    #[error("cannot {op} state file {path}")]
    Io {
        /// "read", "write" or "open".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a zygote state file.
    #[error("{path} is not a zygote state file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Written by another format version.
    #[error("{path} has state format version {found}; this build reads version {STATE_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The payload is larger than any real machine state.
    #[error("{path} claims a {len}-byte payload (limit {STATE_MAX_LEN})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Claimed length.
        len: u64,
    },
    /// Shorter than its header says.
    #[error("{path} is truncated: {found} of {expected} bytes")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Expected length.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// The payload does not match its checksum.
    #[error("{path} is corrupt: checksum {found:#010x}, header says {expected:#010x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// From the header.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The payload does not decode into this build's types.
    #[error("{path} does not decode")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: postcard::Error,
    },
    /// The state does not encode (a bug).
    #[error("cannot encode the machine state")]
    Encode(#[source] postcard::Error),
}

fn encode_header(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&STATE_MAGIC);
    h[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    h
}

/// Writes `state` to a new file at `path` (mode 0600) and flushes it to disk.
pub fn write_state<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let payload = postcard::to_stdvec(state).map_err(StateFileError::Encode)?;
    let io = |op| {
        move |source| StateFileError::Io {
            op,
            path: path.into(),
            source,
        }
    };
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create"))?;
    file.write_all(&encode_header(&payload))
        .and_then(|()| file.write_all(&payload))
        .and_then(|()| file.sync_all())
        .map_err(io("write"))
}

/// Reads and checks a state file written by [`write_state`].
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let io = |op| {
        move |source| StateFileError::Io {
            op,
            path: path.into(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("read"))?.len();
    let mut header = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        // Too short for a header: a magic mismatch if even that is wrong.
        let mut head = Vec::new();
        file.read_to_end(&mut head).map_err(io("read"))?;
        if !STATE_MAGIC.starts_with(&head[..head.len().min(8)]) || head.is_empty() {
            return Err(StateFileError::BadMagic { path: path.into() });
        }
        return Err(StateFileError::Truncated {
            path: path.into(),
            expected: HEADER_LEN as u64,
            found: len,
        });
    }
    file.read_exact(&mut header).map_err(io("read"))?;
    if header[..8] != STATE_MAGIC {
        return Err(StateFileError::BadMagic { path: path.into() });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(StateFileError::Version {
            path: path.into(),
            found: version,
        });
    }
    let payload_len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if payload_len > STATE_MAX_LEN {
        return Err(StateFileError::TooLarge {
            path: path.into(),
            len: payload_len,
        });
    }
    let expected_len = HEADER_LEN as u64 + payload_len;
    if len != expected_len {
        return Err(StateFileError::Truncated {
            path: path.into(),
            expected: expected_len,
            found: len,
        });
    }
    let mut payload = vec![0u8; payload_len as usize];
    file.read_exact(&mut payload).map_err(io("read"))?;
    let expected = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
    let found = crc32fast::hash(&payload);
    if found != expected {
        return Err(StateFileError::Checksum {
            path: path.into(),
            expected,
            found,
        });
    }
    postcard::from_bytes(&payload).map_err(|source| StateFileError::Decode {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: String,
    }

    fn sample() -> Sample {
        Sample {
            a: 0xdead_beef,
            b: vec![1, 2, 3],
            c: "zygote".into(),
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("zygote-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(bytes, offset)
            .unwrap();
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let path = temp("ok");
        write_state(&path, &sample()).unwrap();
        assert_eq!(read_state::<Sample>(&path).unwrap(), sample());
        assert!(
            matches!(
                write_state(&path, &sample()),
                Err(StateFileError::Io { op: "create", .. })
            ),
            "an existing file is never overwritten"
        );

        let bad = temp("magic");
        std::fs::copy(&path, &bad).unwrap();
        patch(&bad, 0, b"NOTZYGOT");
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::BadMagic { .. })
        ));

        let bad = temp("version");
        std::fs::copy(&path, &bad).unwrap();
        patch(&bad, 8, &99u32.to_le_bytes());
        let err = read_state::<Sample>(&bad).unwrap_err();
        assert!(matches!(err, StateFileError::Version { found: 99, .. }));
        assert!(err.to_string().contains("version 99"), "{err}");

        let bad = temp("checksum");
        std::fs::copy(&path, &bad).unwrap();
        let len = std::fs::metadata(&bad).unwrap().len();
        patch(&bad, len - 1, b"X");
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::Checksum { .. })
        ));

        let bad = temp("truncated");
        std::fs::copy(&path, &bad).unwrap();
        File::options()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::Truncated { .. })
        ));

        let bad = temp("huge");
        std::fs::copy(&path, &bad).unwrap();
        patch(&bad, 16, &u64::MAX.to_le_bytes());
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::TooLarge { .. })
        ));

        let bad = temp("short");
        std::fs::write(&bad, b"ZYGO").unwrap();
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::Truncated { .. })
        ));
        std::fs::write(&bad, b"").unwrap();
        assert!(matches!(
            read_state::<Sample>(&bad),
            Err(StateFileError::BadMagic { .. })
        ));

        // A valid file of another type: the checksum matches, decoding fails cleanly.
        let other = temp("other");
        write_state(&other, &7u8).unwrap();
        assert!(matches!(
            read_state::<Sample>(&other),
            Err(StateFileError::Decode { .. })
        ));

        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
