//! The `LISTEN` connection: commits of any instance ring this instance's [`Wakes`]. A
//! notification is lost while the connection is down, so everything woken here also polls
//! (the tailer every 250 ms); the connection is made again after a pause.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// Decisions were recorded (the payload is the new head position).
pub const DECISIONS: &str = "chargegate_decisions";
/// Requests were queued or handed back.
pub const QUEUE: &str = "chargegate_queue";
/// Webhook deliveries were added or redriven.
pub const OUTBOX: &str = "chargegate_outbox";
/// Grants were written.
pub const GRANTS: &str = "chargegate_grants";

const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// What a commit of any instance wakes.
#[derive(Default)]
pub struct Wakes {
    pub decisions: Notify,
    pub queue: Notify,
    pub outbox: std::sync::Arc<Notify>,
    pub grants: Notify,
}

impl Wakes {
    fn ring(&self, channel: &str) {
        match channel {
            DECISIONS => self.decisions.notify_one(),
            QUEUE => self.queue.notify_one(),
            OUTBOX => self.outbox.notify_one(),
            GRANTS => self.grants.notify_one(),
            _ => {}
        }
    }

    /// After a reconnect: something may have been missed.
    fn ring_all(&self) {
        for channel in [DECISIONS, QUEUE, OUTBOX, GRANTS] {
            self.ring(channel);
        }
    }
}

/// Listens until `stop`, reconnecting when the connection drops.
pub async fn run(
    config: tokio_postgres::Config,
    wakes: std::sync::Arc<Wakes>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ended = listen(&config, &wakes) => {
                if let Err(e) = ended {
                    tracing::warn!(error = %e, "the PostgreSQL notification connection failed; polling until it is back");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    wakes: &Wakes,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement =
        format!("LISTEN {DECISIONS}; LISTEN {QUEUE}; LISTEN {OUTBOX}; LISTEN {GRANTS};");
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    // The connection is driven by reading its messages, the LISTEN included.
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut subscribe, if !subscribed => {
                done?;
                subscribed = true;
                wakes.ring_all();
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(n))) => wakes.ring(n.channel()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}
