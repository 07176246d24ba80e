//! What keeps callers to what they may do: who they are and what their roles allow
//! ([`auth`], [`clients`]), and how large a request may be ([`message_size`]).

pub mod auth;
pub mod clients;
pub mod message_size;
