//! A real HTTP authorizer for tests: answers as told, counts calls, remembers the last body.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::post};

/// How the fake answers the next calls.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// This status and body.
    Answer(u16, String),
    /// Wait, then answer with this body and 200.
    Slow(Duration, String),
    /// Alternate through these, one per call.
    Cycle(Vec<Behaviour>),
    /// 200 with a body of no announced length that never ends (1 KiB a millisecond).
    Endless,
}

#[derive(Default)]
struct Shared {
    behaviour: Mutex<Option<Behaviour>>,
    calls: AtomicU64,
    last_body: Mutex<Option<serde_json::Value>>,
}

pub struct FakeAuthorizer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAuthorizer {
    pub async fn start(behaviour: Behaviour) -> Self {
        let shared = Arc::new(Shared::default());
        *shared.behaviour.lock().unwrap() = Some(behaviour);
        let app = Router::new()
            .route("/authorize", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    pub fn url(&self) -> url::Url {
        format!("http://{}/authorize", self.addr).parse().unwrap()
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = Some(behaviour);
    }

    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Option<serde_json::Value> {
        self.shared.last_body.lock().unwrap().clone()
    }
}

impl Drop for FakeAuthorizer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, body: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let n = shared.calls.fetch_add(1, Ordering::SeqCst);
    *shared.last_body.lock().unwrap() = serde_json::from_str(&body).ok();
    let mut behaviour = shared
        .behaviour
        .lock()
        .unwrap()
        .clone()
        .expect("a behaviour");
    if let Behaviour::Cycle(list) = behaviour {
        behaviour = list[n as usize % list.len()].clone();
    }
    match behaviour {
        Behaviour::Answer(status, body) => {
            (StatusCode::from_u16(status).unwrap(), body).into_response()
        }
        Behaviour::Slow(delay, body) => {
            tokio::time::sleep(delay).await;
            (StatusCode::OK, body).into_response()
        }
        Behaviour::Cycle(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Behaviour::Endless => {
            let first = futures::stream::once(async {
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(
                    b"{\"allowed\": \"ALLOWED\"",
                ))
            });
            let padding = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Some((Ok(bytes::Bytes::from(vec![b' '; 1024])), ()))
            });
            let body = axum::body::Body::from_stream(futures::StreamExt::chain(first, padding));
            (StatusCode::OK, body).into_response()
        }
    }
}
