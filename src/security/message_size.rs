//! `max_message_bytes`: a request message larger than the limit is answered
//! `RESOURCE_EXHAUSTED` (as the gRPC status table says; tonic's own limit answers
//! `OUT_OF_RANGE`), before its bytes are buffered, and the connection stays open.
//!
//! The layer reads the gRPC framing of the request body as it streams by (a compressed-flag byte
//! and a big-endian length before each message) and fails the body at the first length past the
//! limit. tonic's decoder finds the `Status` in the body's error and answers with it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tower::{Layer, Service};

/// The gRPC message prefix: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

#[derive(Clone, Copy, Debug)]
pub struct MessageSizeLayer {
    max: usize,
}

impl MessageSizeLayer {
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageSize {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MessageSize<S> {
    inner: S,
    max: usize,
}

impl<S> Service<http::Request<tonic::body::Body>> for MessageSize<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.max;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(Limited {
                inner: body,
                framing: Framing::new(max),
            })
        }))
    }
}

/// Where the body is in its gRPC framing.
#[derive(Debug)]
struct Framing {
    max: usize,
    /// The prefix of the next message, as far as it came.
    prefix: [u8; PREFIX],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

impl Framing {
    fn new(max: usize) -> Self {
        Self {
            max,
            prefix: [0; PREFIX],
            have: 0,
            remaining: 0,
        }
    }

    /// Follows `chunk`; the size of a message past the limit, if one begins in it.
    fn follow(&mut self, mut chunk: &[u8]) -> Result<(), usize> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (PREFIX - self.have).min(chunk.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&chunk[..n]);
            self.have += n;
            chunk = &chunk[n..];
            if self.have == PREFIX {
                self.have = 0;
                let len =
                    u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes")) as usize;
                if len > self.max {
                    return Err(len);
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    struct Limited<B> {
        #[pin]
        inner: B,
        framing: Framing,
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = bytes::Bytes, Error = Status>,
{
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(len) = this.framing.follow(data.chunk())
        {
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "the request message is {len} bytes, more than max_message_bytes ({})",
                this.framing.max
            )))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len));
        out
    }

    #[test]
    fn messages_up_to_the_limit_pass_in_any_chunking() {
        let mut stream = message(100);
        stream.extend(message(0));
        stream.extend(message(100));
        for size in [1, 2, 3, 5, 7, 64, 1000] {
            let mut framing = Framing::new(100);
            for chunk in stream.chunks(size) {
                assert_eq!(framing.follow(chunk), Ok(()), "chunks of {size}");
            }
            assert_eq!((framing.have, framing.remaining), (0, 0));
        }
    }

    #[test]
    fn the_first_message_past_the_limit_fails_wherever_its_prefix_is_cut() {
        let mut stream = message(10);
        stream.extend(message(101));
        for size in [1, 2, 3, 4, 6, 1000] {
            let mut framing = Framing::new(100);
            let failed = stream
                .chunks(size)
                .map(|c| framing.follow(c))
                .find(Result::is_err);
            assert_eq!(failed, Some(Err(101)), "chunks of {size}");
        }
        // A length prefix of 4 GiB - 1 is refused from its prefix alone.
        let mut framing = Framing::new(65_536);
        assert_eq!(
            framing.follow(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(u32::MAX as usize)
        );
    }
}
