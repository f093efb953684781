//! Every NATS name idsync uses: streams, subjects, the cookie bucket and durable consumers.
//!
//! Services never spell a subject themselves; they call these so that a rename
//! happens in one place.

/// Stream of change events read from the directories by the detector.
pub const CHANGES_STREAM: &str = "IDSYNC_CHANGES";
/// Subjects captured by [`CHANGES_STREAM`].
pub const CHANGES_SUBJECTS: &str = "idsync.changes.>";

/// Subject of the change events of one resource: `idsync.changes.<resource>`.
pub fn change_subject(resource: &str) -> String {
    format!("idsync.changes.{resource}")
}

/// Stream of decisions (commands) made by the correlator.
pub const DECISIONS_STREAM: &str = "IDSYNC_DECISIONS";
/// Subjects captured by [`DECISIONS_STREAM`].
pub const DECISIONS_SUBJECTS: &str = "idsync.decisions.>";

/// Subject of the decisions about one resource, under the agreement it
/// writes with: `idsync.decisions.<agreement>.<resource>`.
pub fn decision_subject(agreement: &str, resource: &str) -> String {
    format!("idsync.decisions.{agreement}.{resource}")
}

/// Every decision of one agreement (a consumer's filter).
pub fn agreement_decisions(agreement: &str) -> String {
    format!("idsync.decisions.{agreement}.>")
}

/// Durable consumer of the applier for one agreement; each agreement has its
/// own, so that one that halts holds back nobody else's changes.
pub fn applier_durable(agreement: &str) -> String {
    format!("applier-{agreement}")
}

/// Stream of focus (identity) changes applied to the IDM, read by the provisioner.
pub const FOCUS_STREAM: &str = "IDSYNC_FOCUS";
/// Subjects captured by [`FOCUS_STREAM`].
pub const FOCUS_SUBJECTS: &str = "idsync.focus.>";
/// The one subject focus changes are published on.
pub const FOCUS_SUBJECT: &str = "idsync.focus.changes";

/// Stream of parked (dead-lettered) messages.
pub const DEAD_STREAM: &str = "IDSYNC_DEAD";
/// Subjects captured by [`DEAD_STREAM`].
pub const DEAD_SUBJECTS: &str = "idsync.dead.>";

/// Subject of the messages a service gave up on: `idsync.dead.<service>`.
pub fn dead_subject(service: &str) -> String {
    format!("idsync.dead.{service}")
}

/// Core NATS subjects (not a stream) on which the CLI asks detectors for a
/// full refresh of an agreement: `idsync.control.refresh.<agreement>`.
pub const REFRESH_SUBJECTS: &str = "idsync.control.refresh.>";
pub const REFRESH_PREFIX: &str = "idsync.control.refresh.";

pub fn refresh_subject(agreement: &str) -> String {
    format!("{REFRESH_PREFIX}{agreement}")
}

/// Key-value bucket holding each resource's last sync cookie.
pub const COOKIE_BUCKET: &str = "idsync_cookies";

/// Durable consumer of the correlator (on [`CHANGES_STREAM`]).
pub const CORRELATOR: &str = "correlator";
/// The applier's name (its durables are per agreement: [`applier_durable`]).
pub const APPLIER: &str = "applier";
/// Durable consumer of the provisioner (on [`FOCUS_STREAM`]).
pub const PROVISIONER: &str = "provisioner";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_fall_in_their_streams() {
        assert_eq!(change_subject("ldap1"), "idsync.changes.ldap1");
        assert_eq!(decision_subject("hr", "ldap1"), "idsync.decisions.hr.ldap1");
        assert_eq!(agreement_decisions("hr"), "idsync.decisions.hr.>");
        assert_eq!(dead_subject(APPLIER), "idsync.dead.applier");
        for (subject, wildcard) in [
            (change_subject("x"), CHANGES_SUBJECTS),
            (decision_subject("a", "x"), DECISIONS_SUBJECTS),
            (FOCUS_SUBJECT.to_owned(), FOCUS_SUBJECTS),
            (dead_subject("x"), DEAD_SUBJECTS),
        ] {
            let prefix = wildcard.trim_end_matches('>');
            assert!(subject.starts_with(prefix), "{subject} not in {wildcard}");
        }
    }
}
