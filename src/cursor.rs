//! Cursors: opaque positions in the decision log.
//!
//! A cursor names a log (so a cursor from another deployment is refused rather than misread) and a
//! position in it. Clients must not parse it; the encoding is versioned so it can change.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

const VERSION: u8 = 1;
const LEN: usize = 1 + 4 + 8;

/// A position in one decision log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Identifies the log the position belongs to (random, chosen when the log is created).
    pub log_id: u32,
    /// Position: every decision after it has a greater one.
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cursor")]
pub struct MalformedCursor;

impl Cursor {
    pub fn new(log_id: u32, position: u64) -> Self {
        Self { log_id, position }
    }

    pub fn encode(&self) -> String {
        let mut raw = [0u8; LEN];
        raw[0] = VERSION;
        raw[1..5].copy_from_slice(&self.log_id.to_be_bytes());
        raw[5..].copy_from_slice(&self.position.to_be_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str) -> Result<Self, MalformedCursor> {
        if text.len() > 32 {
            return Err(MalformedCursor);
        }
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| MalformedCursor)?;
        if raw.len() != LEN || raw[0] != VERSION {
            return Err(MalformedCursor);
        }
        let log_id = u32::from_be_bytes(raw[1..5].try_into().expect("4 bytes"));
        let position = u64::from_be_bytes(raw[5..].try_into().expect("8 bytes"));
        Ok(Self { log_id, position })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let c = Cursor::new(0xdead_beef, 42);
        assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        assert_eq!(Cursor::decode(""), Err(MalformedCursor));
        assert_eq!(Cursor::decode("not a cursor"), Err(MalformedCursor));
        assert_eq!(Cursor::decode(&"A".repeat(100)), Err(MalformedCursor));
        let mut other_version = c.encode().into_bytes();
        other_version[0] = b'B';
        assert!(Cursor::decode(std::str::from_utf8(&other_version).unwrap()).is_err());
    }

    #[test]
    fn order_follows_position() {
        assert!(Cursor::new(1, 2) < Cursor::new(1, 3));
    }
}
