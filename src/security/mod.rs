//! What keeps callers to what they may do: who they are and what their roles allow
//! ([`auth`], [`clients`]), how large a request may be ([`message_size`]), and how many a caller may make
//! ([`rate`]).

pub mod auth;
pub mod clients;
pub mod message_size;
pub mod rate;
