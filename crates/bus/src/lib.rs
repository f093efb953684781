//! idsync's message bus: the JetStream streams, the sync-cookie bucket and the
//! durable consumers the services share — the only crate that knows NATS names.
//!
//! [`Bus::connect`] declares everything it needs (idempotently, so every
//! service may call it at start-up); publishing is de-duplicated by message id
//! and acknowledged by the stream; consuming is explicit-ack with redelivery,
//! and poison messages are parked with [`Bus::dead_letter`].

mod bus;
mod consume;
mod error;
pub mod names;
pub mod worker;

pub use bus::{Bus, PendingAck, Published, StoredMessage};
pub use consume::{Deliveries, Delivery};
pub use error::{BusError, Cause};
