//! The RPC audit layer: one tower layer around every service. For each call it records the time,
//! method, peer, client identity, the station and request the handler noted (see
//! [`super::note`]), the gRPC code and the latency; a server stream is recorded when it opens and
//! when it closes, with the count of messages sent. Rejected calls are recorded like any other.
//!
//! The code comes from the response: `grpc-status` in the headers for a call refused at once
//! (trailers-only), in the trailers otherwise. The response body is wrapped to see the trailers,
//! count the messages of a stream, and notice a stream dropped without trailers (the client went
//! away: `CANCELLED`).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};

use super::{AuditSlot, CallRecord, CallSink, StreamEvent};
use crate::decision::Micros;

/// Every method served. Anything else is recorded and counted as `unknown`: a caller choosing
/// paths must not be able to grow the metric's label set or fill records with long paths.
pub(crate) const METHODS: [&str; 17] = [
    "/chargegate.v1.ChargingAuthorization/Authorize",
    "/chargegate.v1.ChargingAuthorization/SubscribeDecisions",
    "/chargegate.v1.ChargingAuthorization/GetDecision",
    "/chargegate.v1.Grants/PutGrant",
    "/chargegate.v1.Grants/DeleteGrant",
    "/chargegate.v1.Grants/ListGrants",
    "/chargegate.v1.Grants/ExplainDecision",
    "/chargegate.v1.Webhooks/ListDeliveries",
    "/chargegate.v1.Webhooks/RedriveDeliveries",
    "/chargegate.v1.Audit/QueryDecisions",
    "/chargegate.v1.Audit/QueryCalls",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "unknown",
];

/// Server-streaming methods: recorded at open and at close.
const STREAMING: [&str; 5] = [
    "/chargegate.v1.ChargingAuthorization/SubscribeDecisions",
    "/chargegate.v1.Audit/QueryDecisions",
    "/chargegate.v1.Audit/QueryCalls",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// Whether `path` is a server-streaming method.
pub(crate) fn is_streaming(path: &str) -> bool {
    STREAMING.contains(&path)
}

/// The layer; without a sink (`audit_calls = false`) it lets calls through unrecorded.
#[derive(Clone)]
pub struct AuditLayer {
    sink: Option<CallSink>,
}

impl AuditLayer {
    pub fn new(sink: Option<CallSink>) -> Self {
        Self { sink }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audited {
            inner,
            sink: self.sink.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    sink: Option<CallSink>,
}

/// What the layer knows of a call before its response ends.
struct Call {
    sink: CallSink,
    at: Micros,
    started: Instant,
    method: &'static str,
    peer: String,
    slot: Arc<AuditSlot>,
    streaming: bool,
}

impl Call {
    fn record(&self, code: Code, event: StreamEvent, messages: u64) {
        // A stream's open leaves the station and request for its close to record too.
        let (station_id, request_id) = if event == StreamEvent::Open {
            self.slot.peek()
        } else {
            self.slot.take()
        };
        let code_name = code_name(code);
        if event != StreamEvent::Open {
            metrics::counter!("chargegate_grpc_requests_total", "method" => self.method, "code" => code_name)
                .increment(1);
        }
        self.sink.submit(CallRecord {
            at: if event == StreamEvent::Close {
                Micros::now()
            } else {
                self.at
            },
            method: self.method.to_owned(),
            peer: self.peer.clone(),
            client: self.slot.client(),
            station_id,
            request_id,
            code: code_name.to_owned(),
            latency_us: self.started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64,
            event,
            messages_sent: messages,
        });
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Audited<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<AuditedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let method: &'static str = METHODS
            .into_iter()
            .find(|m| *m == request.uri().path())
            .unwrap_or("unknown");
        let Some(sink) = self.sink.clone() else {
            let response = self.inner.call(request);
            return Box::pin(async move {
                let (parts, body) = response.await?.into_parts();
                Ok(http::Response::from_parts(
                    parts,
                    AuditedBody {
                        inner: body,
                        call: None,
                        messages: MessageCounter::default(),
                    },
                ))
            });
        };
        let peer = crate::security::peer_addr(request.extensions())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let slot = Arc::new(AuditSlot::default());
        request.extensions_mut().insert(slot.clone());
        let call = Call {
            sink,
            at: Micros::now(),
            started: Instant::now(),
            streaming: STREAMING.contains(&method),
            method,
            peer,
            slot,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let refused = parts
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(Code::from_i32);
            let pending = match refused {
                // Trailers-only: the call ended with its headers.
                Some(code) => {
                    call.record(code, StreamEvent::None, 0);
                    None
                }
                None => {
                    if call.streaming {
                        call.record(Code::Ok, StreamEvent::Open, 0);
                    }
                    Some(call)
                }
            };
            Ok(http::Response::from_parts(
                parts,
                AuditedBody {
                    inner: body,
                    call: pending,
                    messages: MessageCounter::default(),
                },
            ))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when it ends.
    pub struct AuditedBody<B> {
        #[pin]
        inner: B,
        // `None` once recorded.
        call: Option<Call>,
        messages: MessageCounter,
    }

    impl<B> PinnedDrop for AuditedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(call) = this.call.take() {
                let event = if call.streaming { StreamEvent::Close } else { StreamEvent::None };
                call.record(Code::Cancelled, event, this.messages.count);
            }
        }
    }
}

impl<B: Body> Body for AuditedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.messages.feed(bytes::Buf::chunk(data));
            } else if let Some(trailers) = frame.trailers_ref()
                && let Some(call) = this.call.take()
            {
                let code = trailers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(Code::Unknown, Code::from_i32);
                let event = if call.streaming {
                    StreamEvent::Close
                } else {
                    StreamEvent::None
                };
                call.record(code, event, this.messages.count);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts gRPC messages in a response body: each is a 5-byte prefix (flag, big-endian length)
/// and its payload, split across data frames any way the encoder likes.
#[derive(Default)]
struct MessageCounter {
    count: u64,
    /// Bytes of the current message's payload still to come.
    payload_left: u64,
    /// The prefix read so far.
    prefix: [u8; 5],
    prefix_len: usize,
}

impl MessageCounter {
    /// Data frames from tonic's encoder are contiguous (`Bytes`), so a frame is its first chunk.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let take = (self.payload_left as usize).min(bytes.len());
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            let take = (5 - self.prefix_len).min(bytes.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&bytes[..take]);
            self.prefix_len += take;
            bytes = &bytes[take..];
            if self.prefix_len == 5 {
                self.count += 1;
                self.payload_left = u64::from(u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]));
                self.prefix_len = 0;
            }
        }
    }
}

/// The canonical name of a gRPC code, e.g. `INVALID_ARGUMENT`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            out.push(0);
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn counts_messages_however_the_frames_split_them() {
        let wire = framed(&[b"hello", b"", &[7u8; 300], b"x"]);
        for split in [1, 2, 3, 5, 7, 64, wire.len()] {
            let mut counter = MessageCounter::default();
            for chunk in wire.chunks(split) {
                counter.feed(chunk);
            }
            assert_eq!(counter.count, 4, "split every {split} bytes");
            assert_eq!((counter.payload_left, counter.prefix_len), (0, 0));
        }
    }
}
