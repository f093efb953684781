//! The correlator: for each change event, finds the shadow and its owner or
//! runs the correlation rules, decides the situation and the configured
//! reaction, and publishes that decision for the applier.

use std::collections::BTreeMap;
use std::sync::Arc;

use idsync_bus::worker::{Handling, Message, Source, backoff, run_worker};
use idsync_bus::{Bus, BusError, names};
use idsync_core::config::Config;
use idsync_core::model::SourceChange;
use idsync_core::situation::reaction;
use idsync_idm_client::{CorrelateError, IdmClient, IdmError, correlate};
use idsync_proto::v1;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "correlator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
}

/// Consumes the change stream until `shutdown`.
///
/// # Errors
/// NATS cannot be reached at start, or the IDM URL is malformed.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    // Each agreement's entries are read with that agreement's token; a
    // missing one is a configuration error, named before anything connects.
    let concurrency = config.workers.inbound_concurrency as usize;
    // The reads of the messages in hand go to the IDM together.
    let clients: BTreeMap<String, IdmClient> = idsync_runtime::agreement_clients(&config)?
        .into_iter()
        .map(|(agreement, idm)| (agreement, idm.with_batching(concurrency)))
        .collect();
    let bus = Bus::connect_with(&config.nats.url, Some(config.nats.retention())).await?;
    let source = Source {
        service: SERVICE,
        stream: names::CHANGES_STREAM,
        durable: names::CORRELATOR,
        filter_subject: None,
        concurrency,
    };
    run_worker(&bus, source, shutdown, |msg| {
        handle(&config, &clients, &bus, msg)
    })
    .await?;
    Ok(())
}

#[tracing::instrument(skip_all, fields(seq = msg.stream_seq))]
async fn handle(
    config: &Config,
    clients: &BTreeMap<String, IdmClient>,
    bus: &Bus,
    msg: Message,
) -> Handling {
    let event = match v1::ChangeEvent::decode(msg.payload.as_ref()) {
        Ok(e) => e,
        Err(e) => return Handling::Poison(format!("not a ChangeEvent: {e}")),
    };
    let change = match SourceChange::try_from(event.clone()) {
        Ok(c) => c,
        Err(e) => return Handling::Poison(e.to_string()),
    };
    let resource = match config.resource(&change.resource) {
        Ok(r) => r,
        Err(e) => return Handling::Poison(e.to_string()),
    };
    let Some((agreement, _)) = config.agreement_for(&change.resource) else {
        return Handling::Poison(format!(
            "resource {} writes under no sync agreement, so its changes cannot reach the IDM",
            change.resource
        ));
    };
    if config.is_excluded(&change.resource, &change.entry_uuid) {
        tracing::info!(resource = %change.resource, dn = %change.dn, entry_uuid = %change.entry_uuid, agreement, "excluded by the agreement's configuration; skipped");
        return Handling::Done;
    }
    let Some(idm) = clients.get(agreement) else {
        return Handling::Poison(format!("agreement {agreement} has no IDM client"));
    };
    let mut decision = v1::Decision {
        schema_version: idsync_proto::SCHEMA_VERSION,
        change: Some(event),
        change_seq: msg.stream_seq,
        ..Default::default()
    };
    let correlation = match correlate(idm, config, &change).await {
        Ok(c) => c,
        Err(CorrelateError::Idm(e)) if e.is_transient() => {
            return Handling::Retry {
                delay: backoff(msg.delivered),
                reason: e.to_string(),
            };
        }
        Err(CorrelateError::Idm(e @ IdmError::Unauthenticated(_))) => {
            return Handling::Retry {
                delay: backoff(msg.delivered.max(8)),
                reason: format!("agreement {agreement}: {e}"),
            };
        }
        // An import error: the applier handles it, in order, under the
        // agreement's failure policy.
        Err(e) => {
            decision.failure = format!("entry {:?}: {e}", change.dn);
            return publish(bus, agreement, &change.resource, &decision, &msg).await;
        }
    };
    let Some(situation) = correlation.situation else {
        // The deletion of an entry never seen. Its add may still be on its
        // way to the IDM (another replica, a redelivery): the applier keeps
        // a tombstone at this position, so that the add is discarded when
        // it comes, or finds the shadow and deletes what the add made.
        tracing::debug!(entry_uuid = %change.entry_uuid, "deletion of an entry not known yet; passed on");
        decision.shadow_version = correlation.shadow.as_ref().map_or(0, |s| s.version);
        return publish(bus, agreement, &change.resource, &decision, &msg).await;
    };
    let (action, _) = reaction(resource, situation);
    tracing::info!(resource = %change.resource, dn = %change.dn, %situation, reaction = %action, "decided");
    idsync_telemetry::metrics::inc(
        "idsync_decisions_total",
        "Correlation decisions, by resource, situation and reaction.",
        &[
            ("resource", &change.resource),
            ("situation", &situation.to_string()),
            ("reaction", &action.to_string()),
        ],
    );
    decision.situation = situation.to_string();
    decision.reaction = action.to_string();
    decision.focus_id = correlation
        .focus
        .as_ref()
        .map(|f| f.id.clone())
        .unwrap_or_default();
    decision.shadow_version = correlation.shadow.as_ref().map_or(0, |s| s.version);
    decision.focus_version = correlation.focus.as_ref().map_or(0, |f| f.version);
    publish(bus, agreement, &change.resource, &decision, &msg).await
}

async fn publish(
    bus: &Bus,
    agreement: &str,
    resource: &str,
    decision: &v1::Decision,
    msg: &Message,
) -> Handling {
    let subject = names::decision_subject(agreement, resource);
    match bus
        .publish_and_wait(
            &subject,
            &format!("decision:{}", msg.stream_seq),
            decision.encode_to_vec().into(),
        )
        .await
    {
        Ok(_) => Handling::Done,
        Err(e) => Handling::Retry {
            delay: backoff(msg.delivered),
            reason: e.to_string(),
        },
    }
}
