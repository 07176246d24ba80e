//! What keeps hostile or runaway callers from hurting the server: the size of a request message
//! (and, as they arrive, identities, scopes and rate limits).

pub mod message_size;
