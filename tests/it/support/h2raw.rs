//! A hostile HTTP/2 peer: frames written byte by byte over TCP, so a test can send what no
//! well-behaved client library would (malformed requests, floods, half prefaces) and read what the
//! server answers frame by frame.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// HTTP/2 error code `ENHANCE_YOUR_CALM`: the peer made too much work.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame's bytes: the 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block of literal fields without indexing or Huffman coding (names and values shorter
/// than 127 bytes).
pub fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127, "short fields only");
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The request headers of a gRPC call of `path`.
pub fn grpc_call(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A frame the server sent.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's error code.
    pub fn goaway_code(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }
}

/// A raw connection to an HTTP/2 server.
pub struct RawConnection {
    pub stream: TcpStream,
}

impl RawConnection {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn open(addr: std::net::SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.expect("preface");
        Self { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Whether the server closes the connection within `wait`, whatever it sends before.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        closed_within(&mut self.stream, wait).await
    }

    /// Whether the connection still answers a PING within `wait` (skipping other frames).
    pub async fn answers_ping(&mut self, wait: Duration) -> bool {
        if self.send(&frame(PING, 0, 0, b"chargeg8")).await.is_err() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(f) if f.kind == PING && f.flags & ACK != 0 => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    }

    /// The next frame, or `None` when the server closed the connection (or reset it) or nothing
    /// came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let read = async {
            let mut header = [0u8; 9];
            self.stream.read_exact(&mut header).await.ok()?;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).await.ok()?;
            Some(Frame {
                kind: header[3],
                flags: header[4],
                stream: u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload,
            })
        };
        tokio::time::timeout(wait, read).await.ok().flatten()
    }
}

/// Whether the server closes `stream` within `wait`, whatever it sends before.
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(wait, drain).await.is_ok()
}
