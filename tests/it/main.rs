//! Integration tests: each starts the real server on an ephemeral port and talks gRPC to it.

mod support;

mod advisories;
mod archive;
mod audit;
mod crash;
mod decisions;
mod deploy;
mod fuzz_corpora;
mod grants;
mod hostile;
mod intake;
mod lifecycle;
mod remote;
mod revisions;
mod scaleout;
mod security;
mod streams;
mod tls;
mod webhooks;
