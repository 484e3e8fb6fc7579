//! Clients of the three backends, apart from the actors that use them.

pub mod kafka;
pub mod mongo;
pub mod redis;
