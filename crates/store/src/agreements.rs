//! Sync agreements: their records, tokens, status, and their end (finalise
//! or terminate).

use std::collections::HashMap;

use idsync_proto::v1;

use crate::commit::{Principal, Tables};
use crate::kv::{KvExt, KvWriteExt, Tbl};
use crate::token::{self, Claims, TokenError};
use crate::{REVOCATIONS, Store, StoreError, now_ms};

/// Tokens already checked against their agreement's record.
#[derive(Debug, Default)]
pub(crate) struct Verified {
    /// Bumped by every change that can revoke a token, so that a check that
    /// read the record before such a change does not cache its answer after it.
    generation: u64,
    /// The stored revocation count the cached answers were checked under;
    /// a shared database's other replicas bump it when they revoke.
    revocations: u64,
    /// Token hash → agreement.
    tokens: HashMap<Vec<u8>, String>,
}

/// The origin recorded on focus changes that an agreement's end causes.
const ORIGIN: &str = "";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Store {
    /// Runs `f` on the tables of one write transaction and commits.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transact(true, |kv| {
            let mut t = Tables::open(kv)?;
            let out = f(&mut t)?;
            t.finish()?;
            Ok(out)
        })
    }

    /// Changes agreement `name` with `f` and returns it as stored.
    fn update_agreement(
        &self,
        name: &str,
        f: impl FnOnce(&mut v1::Agreement) -> Result<(), StoreError>,
    ) -> Result<v1::Agreement, StoreError> {
        let mut a = self.write(|t| {
            let mut a = t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            f(&mut a)?;
            t.put_agreement(&a)?;
            Ok(a)
        })?;
        a.entries = self.count_entries(name)?;
        Ok(a)
    }

    /// Creates agreement `name`: no tokens, nothing yielded, status Unknown.
    ///
    /// # Errors
    /// [`StoreError::AgreementExists`], or a name that cannot name NATS subjects.
    pub fn create_agreement(&self, name: &str) -> Result<v1::Agreement, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadRequest(format!(
                "agreement name {name:?}: use 1 to 64 letters, digits, '-' or '_'"
            )));
        }
        let id = token::new_id().map_err(StoreError::Db)?;
        self.write(|t| {
            if t.agreement(name)?.is_some() {
                return Err(StoreError::AgreementExists {
                    name: name.to_owned(),
                });
            }
            let a = v1::Agreement {
                name: name.to_owned(),
                id,
                created_at_ms: now_ms(),
                ..Default::default()
            };
            t.put_agreement(&a)?;
            Ok(a)
        })
    }

    /// Every agreement, by name, with its entry count.
    pub fn list_agreements(&self) -> Result<Vec<v1::Agreement>, StoreError> {
        let mut out: Vec<v1::Agreement> = Vec::new();
        self.read(|kv| {
            kv.each(Tbl::Agreement, "", &mut |_, a| {
                out.push(a);
                Ok(true)
            })
        })?;
        for a in &mut out {
            a.entries = self.count_entries(&a.name)?;
        }
        Ok(out)
    }

    pub fn get_agreement(&self, name: &str) -> Result<Option<v1::Agreement>, StoreError> {
        let Some(mut a) = self.agreement_record(name)? else {
            return Ok(None);
        };
        a.entries = self.count_entries(name)?;
        Ok(Some(a))
    }

    fn count_entries(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.children(name)?.len() as u64)
    }

    /// Ids of the focus objects whose sync parent is `name`.
    fn children(&self, name: &str) -> Result<Vec<String>, StoreError> {
        self.read(|kv| kv.suffixes(Tbl::SyncChild, &format!("{name}\0")))
    }

    /// Issues a token labelled `label` for agreement `name`. The token is
    /// returned once; the store keeps its hash.
    ///
    /// # Errors
    /// No such agreement, or `label` already names one of its tokens.
    pub fn generate_token(
        &self,
        name: &str,
        label: &str,
    ) -> Result<(String, v1::Agreement), StoreError> {
        if label.trim().is_empty() || label.len() > 128 || label.chars().any(char::is_control) {
            return Err(StoreError::BadRequest(
                "a token label has 1 to 128 printable characters".into(),
            ));
        }
        let claims = Claims {
            agreement: name.to_owned(),
            id: token::new_id().map_err(StoreError::Db)?,
            issued_ms: now_ms(),
        };
        let token = token::issue(&self.token_key, &claims);
        let hash = token::hash(&token);
        let a = self.update_agreement(name, |a| {
            if a.tokens.iter().any(|t| t.label == label) {
                return Err(StoreError::BadRequest(format!(
                    "agreement {name:?} already has a token labelled {label:?}; destroy it first or pick another label"
                )));
            }
            a.tokens.push(v1::TokenInfo {
                label: label.to_owned(),
                id: claims.id.clone(),
                hash,
                issued_at_ms: claims.issued_ms,
            });
            Ok(())
        })?;
        Ok((token, a))
    }

    /// Revokes the token labelled `label`, or every token when `label` is `None`.
    ///
    /// # Errors
    /// No such agreement, or no token with that label.
    pub fn destroy_token(
        &self,
        name: &str,
        label: Option<&str>,
    ) -> Result<v1::Agreement, StoreError> {
        let a = self.revoking_update(name, |a| {
            match label {
                None => a.tokens.clear(),
                Some(label) => {
                    let before = a.tokens.len();
                    a.tokens.retain(|t| t.label != label);
                    if a.tokens.len() == before {
                        return Err(StoreError::BadRequest(format!(
                            "agreement {name:?} has no token labelled {label:?}"
                        )));
                    }
                }
            }
            Ok(())
        })?;
        self.forget_verified();
        Ok(a)
    }

    /// Replaces the attributes agreement `name` yields to the IDM.
    ///
    /// # Errors
    /// No such agreement, or an attribute the agreement cannot yield (`name`).
    pub fn set_yield_attributes(
        &self,
        name: &str,
        attributes: &[String],
    ) -> Result<v1::Agreement, StoreError> {
        if let Some(bad) = attributes
            .iter()
            .find(|a| a.is_empty() || a.chars().any(char::is_whitespace))
        {
            return Err(StoreError::BadRequest(format!(
                "{bad:?} is not an attribute name"
            )));
        }
        if attributes.iter().any(|a| a == crate::NAME) {
            return Err(StoreError::BadRequest(
                "an agreement cannot yield `name`: it identifies its entries".into(),
            ));
        }
        let mut attributes = attributes.to_vec();
        attributes.sort();
        attributes.dedup();
        self.update_agreement(name, |a| {
            a.yield_attributes = attributes;
            Ok(())
        })
    }

    /// Stops agreement `name` at `failure` (halt), or only records it.
    pub fn record_failure(
        &self,
        name: &str,
        mut failure: v1::AgreementFailure,
        halt: bool,
    ) -> Result<v1::Agreement, StoreError> {
        failure.at_ms = now_ms();
        self.update_agreement(name, |a| {
            a.state = v1::AgreementState::Err as i32;
            // A halted agreement keeps the failure that stopped it.
            if !a.halted {
                a.last_error = Some(failure);
            }
            a.halted |= halt;
            Ok(())
        })
    }

    /// Lifts a halt; the status stays Err until the next success.
    pub fn resume_agreement(&self, name: &str) -> Result<v1::Agreement, StoreError> {
        self.update_agreement(name, |a| {
            a.halted = false;
            Ok(())
        })
    }

    /// Lets `resource`'s deletions through its guard for `window_ms`, and
    /// resumes agreement `name`.
    pub fn accept_deletions(
        &self,
        name: &str,
        resource: &str,
        window_ms: i64,
    ) -> Result<v1::Agreement, StoreError> {
        self.guard_and_resume(name, resource, |g| {
            g.allow_until_ms = now_ms() + window_ms;
        })
    }

    /// Skips `resource`'s deletions from changes up to `through_seq`, and
    /// resumes agreement `name`.
    pub fn discard_deletions(
        &self,
        name: &str,
        resource: &str,
        through_seq: u64,
    ) -> Result<v1::Agreement, StoreError> {
        self.guard_and_resume(name, resource, |g| {
            g.discard_through_seq = g.discard_through_seq.max(through_seq);
        })
    }

    fn guard_and_resume(
        &self,
        name: &str,
        resource: &str,
        change: impl FnOnce(&mut v1::DeletionGuardState),
    ) -> Result<v1::Agreement, StoreError> {
        let mut a = self.write(|t| {
            let mut a = t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            let mut g = t.guard_state(resource)?;
            change(&mut g);
            t.put_guard_state(resource, &g)?;
            a.halted = false;
            t.put_agreement(&a)?;
            Ok(a)
        })?;
        a.entries = self.count_entries(name)?;
        Ok(a)
    }

    /// Ends agreement `name`, releasing its entries to the IDM: each loses its
    /// sync parent. The agreement and its tokens are gone. Returns how many
    /// entries were released.
    pub fn finalise_agreement(&self, name: &str) -> Result<u64, StoreError> {
        let ids = self.children(name)?;
        let released = self.write(|t| {
            t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            let mut released = 0;
            for id in &ids {
                t.kv.del(Tbl::SyncChild, &format!("{name}\0{id}"))?;
                let Some(mut f) = t.load::<v1::Focus>(Tbl::Focus, id)? else {
                    continue;
                };
                f.sync_parent.clear();
                t.rewrite_focus(f, ORIGIN)?;
                released += 1;
            }
            t.kv.del(Tbl::Agreement, name)?;
            bump_revocations(t)?;
            Ok(released)
        })?;
        self.forget_verified();
        Ok(released)
    }

    /// Ends agreement `name`, deleting every entry it created and the shadows
    /// of `resources` (those that write under it). Entries already deleted
    /// are simply not there. Returns how many entries were deleted.
    pub fn terminate_agreement(&self, name: &str, resources: &[String]) -> Result<u64, StoreError> {
        let ids = self.children(name)?;
        let shadow_keys = self.read(|kv| {
            let mut keys = Vec::new();
            for r in resources {
                let prefix = format!("{r}\0");
                keys.extend(
                    kv.suffixes(Tbl::Shadow, &prefix)?
                        .into_iter()
                        .map(|uuid| format!("{prefix}{uuid}")),
                );
            }
            Ok(keys)
        })?;
        let deleted = self.write(|t| {
            t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            let mut deleted = 0;
            for id in &ids {
                if t.delete_focus(id, ORIGIN)?.is_some() {
                    deleted += 1;
                }
            }
            for k in &shadow_keys {
                if let Some(s) = t.load::<v1::Shadow>(Tbl::Shadow, k)? {
                    for mk in crate::shadow_member_keys(&s) {
                        t.kv.del(Tbl::ShadowByMemberKey, &mk)?;
                    }
                }
                t.kv.del(Tbl::Shadow, k)?;
            }
            for r in resources {
                t.kv.del(Tbl::ShadowLive, r)?;
                t.kv.del(Tbl::Guard, r)?;
            }
            t.kv.del(Tbl::Agreement, name)?;
            bump_revocations(t)?;
            Ok(deleted)
        })?;
        self.forget_verified();
        Ok(deleted)
    }

    /// Who presents `credential`: a sync token of an existing agreement whose
    /// record still holds it.
    ///
    /// # Errors
    /// Why the token is refused; never the token itself.
    pub fn authenticate(&self, credential: &str) -> Result<Principal, TokenError> {
        let claims = token::verify(&self.token_key, credential)?;
        let hash = token::hash(credential);
        let unavailable = |e: StoreError| TokenError::Unavailable(e.to_string());
        // Over a shared database another replica may have revoked the token:
        // a cached answer holds only while the stored revocation count is
        // the one it was checked under (one indexed read instead of the record).
        let stored = if self.shares_database() {
            Some(self.revocations().map_err(unavailable)?)
        } else {
            None
        };
        let generation = {
            let mut cache = self.verified_cache();
            if let Some(n) = stored
                && n != cache.revocations
            {
                cache.generation += 1;
                cache.tokens.clear();
                cache.revocations = n;
            }
            if let Some(agreement) = cache.tokens.get(&hash) {
                return Ok(Principal::Agreement(agreement.clone()));
            }
            cache.generation
        };
        let record = self
            .agreement_record(&claims.agreement)
            .map_err(unavailable)?
            .ok_or_else(|| TokenError::NoAgreement {
                agreement: claims.agreement.clone(),
            })?;
        if record
            .tokens
            .iter()
            .any(|t| t.id == claims.id && t.hash == hash)
        {
            let mut cache = self.verified_cache();
            if cache.generation == generation {
                cache.tokens.insert(hash, claims.agreement.clone());
            }
            Ok(Principal::Agreement(claims.agreement))
        } else {
            Err(TokenError::Revoked {
                agreement: claims.agreement,
                id: claims.id,
            })
        }
    }

    fn verified_cache(&self) -> std::sync::MutexGuard<'_, Verified> {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every verified token; called after any change that can revoke one.
    fn forget_verified(&self) {
        let mut cache = self.verified_cache();
        cache.generation += 1;
        cache.tokens.clear();
    }

    /// How many changes that can revoke a token were ever committed.
    fn revocations(&self) -> Result<u64, StoreError> {
        self.read(|kv| Ok(kv.get_u64(Tbl::Meta, REVOCATIONS)?.unwrap_or(0)))
    }

    /// As [`Store::update_agreement`], for a change that can revoke tokens:
    /// it bumps the stored revocation count in the same transaction.
    fn revoking_update(
        &self,
        name: &str,
        f: impl FnOnce(&mut v1::Agreement) -> Result<(), StoreError>,
    ) -> Result<v1::Agreement, StoreError> {
        let mut a = self.write(|t| {
            let mut a = t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            f(&mut a)?;
            t.put_agreement(&a)?;
            bump_revocations(t)?;
            Ok(a)
        })?;
        a.entries = self.count_entries(name)?;
        Ok(a)
    }

    /// Agreement `name` as stored, without counting its entries (cheap: for
    /// status checks and authentication).
    pub fn agreement_record(&self, name: &str) -> Result<Option<v1::Agreement>, StoreError> {
        self.read(|kv| kv.load(Tbl::Agreement, name))
    }
}

/// Counts a change that can revoke tokens, in its own transaction.
fn bump_revocations(t: &mut Tables<'_>) -> Result<(), StoreError> {
    let n = t.kv.get_u64(Tbl::Meta, REVOCATIONS)?.unwrap_or(0);
    t.kv.put_u64(Tbl::Meta, REVOCATIONS, n + 1)
}

/// The one word a status listener answers for `a`.
pub fn status_word(a: &v1::Agreement) -> &'static str {
    match v1::AgreementState::try_from(a.state) {
        Ok(v1::AgreementState::Ok) => "Ok",
        Ok(v1::AgreementState::Err) => "Err",
        _ => "Unknown",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use idsync_proto::v1;
    use v1::operation::Op;

    use crate::token::TokenError;
    use crate::{Principal, Store, StoreError, Writer};

    fn user(id: &str, name: &str, attrs: &[(&str, &str)]) -> v1::Focus {
        let mut attributes: std::collections::HashMap<String, v1::Values> = attrs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    v1::Values {
                        values: vec![(*v).to_owned()],
                    },
                )
            })
            .collect();
        attributes.insert(
            "name".into(),
            v1::Values {
                values: vec![name.into()],
            },
        );
        v1::Focus {
            id: id.into(),
            kind: "user".into(),
            attributes: attributes.into_iter().collect(),
            ..Default::default()
        }
    }

    fn put(f: &v1::Focus, expected: u64) -> Vec<v1::Operation> {
        vec![v1::Operation {
            op: Some(Op::PutFocus(v1::PutFocus {
                focus: Some(f.clone()),
                expected_version: expected,
            })),
        }]
    }

    fn delete(id: &str, expected: u64) -> Vec<v1::Operation> {
        vec![v1::Operation {
            op: Some(Op::DeleteFocus(v1::DeleteFocus {
                id: id.into(),
                expected_version: expected,
            })),
        }]
    }

    fn owners() -> Arc<BTreeMap<String, String>> {
        Arc::new(
            [("hr", "hr"), ("crm", "crm")]
                .map(|(r, a)| (r.to_owned(), a.to_owned()))
                .into(),
        )
    }

    fn setup(place: &crate::testing::Place) -> (Store, Writer, Writer, Writer) {
        let s = place.open();
        s.create_agreement("hr").unwrap();
        s.create_agreement("crm").unwrap();
        let admin = Writer {
            principal: Principal::Admin,
            owners: owners(),
            may_adopt: false,
            guards: Arc::default(),
            trace_parent: None,
        };
        (
            s,
            Writer::agreement("hr", owners()),
            Writer::agreement("crm", owners()),
            admin,
        )
    }

    #[test]
    fn an_agreement_owns_what_it_creates_and_nobody_else_writes_it() {
        for place in crate::testing::places() {
            let (s, hr, crm, admin) = setup(&place);
            s.commit(
                &put(&user("u1", "jack", &[("fullName", "Jack")]), 0),
                "hr",
                &hr,
            )
            .unwrap();
            let stored = s.get_focus("u1").unwrap().unwrap();
            assert_eq!(stored.sync_parent, "hr");
            assert_eq!(s.get_agreement("hr").unwrap().unwrap().entries, 1);

            let mut changed = stored.clone();
            changed.attributes.insert(
                "fullName".into(),
                v1::Values {
                    values: vec!["Captain Jack".into()],
                },
            );
            let e = s.commit(&put(&changed, 1), "crm", &crm).unwrap_err();
            assert!(matches!(e, StoreError::NotOwned { .. }), "{e}");
            assert!(e.to_string().contains("owned by agreement \"hr\""), "{e}");
            let e = s.commit(&put(&changed, 1), "", &admin).unwrap_err();
            assert!(
                e.to_string().contains("\"fullName\" is the agreement's"),
                "{e}"
            );
            let e = s.commit(&delete("u1", 1), "", &admin).unwrap_err();
            assert!(e.to_string().contains("idsync sync terminate hr"), "{e}");
            s.commit(&put(&changed, 1), "hr", &hr).unwrap();
        }
    }

    #[test]
    fn yielded_attributes_are_the_idms_and_the_agreement_is_told_so() {
        for place in crate::testing::places() {
            let (s, hr, _crm, admin) = setup(&place);
            s.commit(&put(&user("u1", "jack", &[]), 0), "hr", &hr)
                .unwrap();
            s.set_yield_attributes("hr", &["preferredLanguage".into()])
                .unwrap();
            let local = user("u1", "jack", &[("preferredLanguage", "de")]);
            let mut local = local;
            local.sync_parent = "hr".into();
            s.commit(&put(&local, 1), "", &admin).unwrap();
            let mut from_source = local.clone();
            from_source.attributes.insert(
                "preferredLanguage".into(),
                v1::Values {
                    values: vec!["en".into()],
                },
            );
            let e = s.commit(&put(&from_source, 2), "hr", &hr).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, StoreError::Yielded { .. }), "{text}");
            assert!(
                text.contains("preferredLanguage") && text.contains("\"hr\""),
                "{text}"
            );
            assert!(text.contains("set-yield-attributes hr"), "{text}");
            // A write that leaves the yielded value alone is the agreement's to make.
            let mut other = local.clone();
            other.attributes.insert(
                "mail".into(),
                v1::Values {
                    values: vec!["j@x".into()],
                },
            );
            s.commit(&put(&other, 2), "hr", &hr).unwrap();
            assert!(
                s.set_yield_attributes("hr", &["name".into()]).is_err(),
                "name cannot be yielded"
            );
        }
    }

    #[test]
    fn native_entries_are_not_an_agreements_and_names_say_who_holds_them() {
        for place in crate::testing::places() {
            let (s, hr, crm, admin) = setup(&place);
            s.commit(&put(&user("n1", "root", &[]), 0), "", &admin)
                .unwrap();
            let native = s.get_focus("n1").unwrap().unwrap();
            assert_eq!(native.sync_parent, "");
            let e = s.commit(&put(&native, 1), "hr", &hr).unwrap_err();
            assert!(e.to_string().contains("a native IDM entry"), "{e}");
            let e = s
                .commit(&put(&user("u2", "root", &[]), 0), "hr", &hr)
                .unwrap_err();
            assert!(
                e.to_string().contains("already taken") && e.to_string().contains("native"),
                "{e}"
            );
            s.commit(&put(&user("u3", "jack", &[]), 0), "hr", &hr)
                .unwrap();
            let e = s
                .commit(&put(&user("u4", "jack", &[]), 0), "crm", &crm)
                .unwrap_err();
            assert!(e.to_string().contains("owned by agreement \"hr\""), "{e}");
        }
    }

    #[test]
    fn an_adopting_agreement_takes_over_a_native_entry_it_writes() {
        for place in crate::testing::places() {
            let (s, hr, _crm, admin) = setup(&place);
            s.commit(&put(&user("n1", "will", &[]), 0), "", &admin)
                .unwrap();
            let native = s.get_focus("n1").unwrap().unwrap();
            let adopting = Writer {
                may_adopt: true,
                ..hr.clone()
            };
            s.commit(&put(&native, 1), "hr", &adopting).unwrap();
            let adopted = s.get_focus("n1").unwrap().unwrap();
            assert_eq!(adopted.sync_parent, "hr");
            assert_eq!(s.get_agreement("hr").unwrap().unwrap().entries, 1);
            // Now the agreement's: an administrator may no longer change it.
            let e = s.commit(&put(&adopted, 2), "", &admin);
            assert!(e.is_ok(), "an unchanged write is allowed: {e:?}");
            let mut changed = adopted.clone();
            changed.attributes.insert(
                "mail".into(),
                v1::Values {
                    values: vec!["w@x".into()],
                },
            );
            assert!(s.commit(&put(&changed, 3), "", &admin).is_err());
        }
    }

    fn shadow(uuid: &str, position: u64, dead: bool) -> v1::Shadow {
        v1::Shadow {
            resource: "hr".into(),
            entry_uuid: uuid.into(),
            position,
            dead,
            ..Default::default()
        }
    }

    fn put_shadow(s: v1::Shadow, expected: u64) -> Vec<v1::Operation> {
        vec![v1::Operation {
            op: Some(Op::PutShadow(v1::PutShadow {
                shadow: Some(s),
                expected_version: expected,
            })),
        }]
    }

    #[test]
    fn the_deletion_guard_stops_the_deletion_that_crosses_it_exactly() {
        for place in crate::testing::places() {
            let (s, hr, ..) = setup(&place);
            let guards = Arc::new(
                [(
                    "hr".to_owned(),
                    crate::GuardLimits {
                        max_count: Some(3),
                        max_share: Some(0.5),
                        window_ms: 60_000,
                    },
                )]
                .into(),
            );
            let hr = Writer { guards, ..hr };
            for i in 0..10 {
                s.commit(
                    &put_shadow(shadow(&format!("e{i}"), 1, false), 0),
                    "hr",
                    &hr,
                )
                .unwrap();
            }
            // Three deletions pass, the fourth crosses max_count.
            for i in 0..3 {
                s.commit(&put_shadow(shadow(&format!("e{i}"), 2, true), 1), "hr", &hr)
                    .unwrap();
            }
            let e = s
                .commit(&put_shadow(shadow("e3", 2, true), 1), "hr", &hr)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    StoreError::MassDeletion {
                        count: 4,
                        population: 10,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("accept-deletions"), "{e}");
            // Discarded: deletions from positions up to 2 are skipped.
            s.discard_deletions("hr", "hr", 2).unwrap();
            let e = s
                .commit(&put_shadow(shadow("e3", 2, true), 1), "hr", &hr)
                .unwrap_err();
            assert!(matches!(e, StoreError::DeletionDiscarded { .. }), "{e}");
            // A later one is checked again, and accepted ones pass.
            let e = s
                .commit(&put_shadow(shadow("e4", 3, true), 1), "hr", &hr)
                .unwrap_err();
            assert!(matches!(e, StoreError::MassDeletion { .. }), "{e}");
            s.accept_deletions("hr", "hr", 60_000).unwrap();
            for i in 4..8 {
                s.commit(&put_shadow(shadow(&format!("e{i}"), 3, true), 1), "hr", &hr)
                    .unwrap();
            }
        }
    }

    #[test]
    fn the_deletion_guard_counts_shares_of_the_live_entries() {
        for place in crate::testing::places() {
            let (s, hr, ..) = setup(&place);
            let guards = Arc::new(
                [(
                    "hr".to_owned(),
                    crate::GuardLimits {
                        max_count: None,
                        max_share: Some(0.5),
                        window_ms: 60_000,
                    },
                )]
                .into(),
            );
            let hr = Writer { guards, ..hr };
            for i in 0..10 {
                s.commit(
                    &put_shadow(shadow(&format!("e{i}"), 1, false), 0),
                    "hr",
                    &hr,
                )
                .unwrap();
            }
            for i in 0..5 {
                s.commit(&put_shadow(shadow(&format!("e{i}"), 2, true), 1), "hr", &hr)
                    .unwrap();
            }
            let e = s
                .commit(&put_shadow(shadow("e5", 2, true), 1), "hr", &hr)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    StoreError::MassDeletion {
                        count: 6,
                        population: 10,
                        ..
                    }
                ),
                "60% of 10: {e}"
            );
        }
    }

    #[test]
    fn schema_violations_are_refused_for_everyone() {
        for place in crate::testing::places() {
            let (s, hr, _crm, admin) = setup(&place);
            for w in [&hr, &admin] {
                let e = s
                    .commit(&put(&user("u1", "john doe", &[]), 0), "hr", w)
                    .unwrap_err();
                assert!(matches!(e, StoreError::Schema { .. }), "{e}");
                let e = s
                    .commit(&put(&user("u1", " ", &[]), 0), "hr", w)
                    .unwrap_err();
                assert!(matches!(e, StoreError::Schema { .. }), "{e}");
            }
        }
    }

    #[test]
    fn tokens_authenticate_until_revoked_one_by_one() {
        for place in crate::testing::places() {
            let (s, ..) = setup(&place);
            let (t1, _) = s.generate_token("hr", "first").unwrap();
            let (t2, _) = s.generate_token("hr", "second").unwrap();
            assert!(
                s.generate_token("hr", "first").is_err(),
                "labels are unique"
            );
            assert_eq!(
                s.authenticate(&t1).unwrap(),
                Principal::Agreement("hr".into())
            );
            s.destroy_token("hr", Some("first")).unwrap();
            assert!(matches!(
                s.authenticate(&t1),
                Err(TokenError::Revoked { .. })
            ));
            assert_eq!(
                s.authenticate(&t2).unwrap(),
                Principal::Agreement("hr".into())
            );
            let a = s.get_agreement("hr").unwrap().unwrap();
            assert_eq!(a.tokens.len(), 1);
            assert_ne!(a.tokens[0].hash, t2.as_bytes(), "only the hash is kept");
            s.destroy_token("hr", None).unwrap();
            assert!(matches!(
                s.authenticate(&t2),
                Err(TokenError::Revoked { .. })
            ));
            // A token of another store does not verify here.
            let other_dir = tempfile::tempdir().unwrap();
            let other = Store::open(other_dir.path()).unwrap();
            other.create_agreement("hr").unwrap();
            let (foreign, _) = other.generate_token("hr", "x").unwrap();
            assert_eq!(s.authenticate(&foreign), Err(TokenError::Forged));
        }
    }

    #[test]
    fn finalise_releases_and_terminate_deletes() {
        for place in crate::testing::places() {
            let (s, hr, crm, admin) = setup(&place);
            s.commit(&put(&user("u1", "jack", &[]), 0), "hr", &hr)
                .unwrap();
            s.commit(&put(&user("u2", "will", &[]), 0), "hr", &hr)
                .unwrap();
            s.commit(&put(&user("c1", "anna", &[]), 0), "crm", &crm)
                .unwrap();
            s.commit(&delete("u2", 1), "hr", &hr).unwrap();
            let (token, _) = s.generate_token("hr", "t").unwrap();
            assert!(s.authenticate(&token).is_ok(), "verified, and remembered");
            assert_eq!(s.finalise_agreement("hr").unwrap(), 1);
            assert!(s.get_agreement("hr").unwrap().is_none());
            assert!(s.authenticate(&token).is_err(), "the token ends with it");
            let jack = s.get_focus("u1").unwrap().unwrap();
            assert_eq!(jack.sync_parent, "");
            s.commit(&put(&jack, jack.version), "", &admin).unwrap();

            assert_eq!(s.terminate_agreement("crm", &["crm".into()]).unwrap(), 1);
            assert!(s.get_focus("c1").unwrap().is_none());
            assert!(s.get_agreement("crm").unwrap().is_none());
            assert!(matches!(
                s.terminate_agreement("crm", &[]),
                Err(StoreError::NoAgreement { .. })
            ));
        }
    }

    #[test]
    fn a_halted_agreement_cannot_commit_until_resumed() {
        for place in crate::testing::places() {
            let (s, hr, ..) = setup(&place);
            let failure = v1::AgreementFailure {
                dn: "uid=x".into(),
                reason: "name taken".into(),
                ..Default::default()
            };
            let a = s.record_failure("hr", failure, true).unwrap();
            assert!(a.halted);
            assert_eq!(crate::status_word(&a), "Err");
            let e = s
                .commit(&put(&user("u1", "jack", &[]), 0), "hr", &hr)
                .unwrap_err();
            assert!(matches!(e, StoreError::Halted { .. }), "{e}");
            s.resume_agreement("hr").unwrap();
            s.commit(&put(&user("u1", "jack", &[]), 0), "hr", &hr)
                .unwrap();
            let a = s.get_agreement("hr").unwrap().unwrap();
            assert_eq!(crate::status_word(&a), "Ok");
            assert!(a.last_success_ms > 0);
        }
    }

    #[test]
    fn a_dry_run_checks_everything_and_keeps_nothing() {
        for place in crate::testing::places() {
            let (s, hr, ..) = setup(&place);
            assert_eq!(
                crate::status_word(&s.get_agreement("hr").unwrap().unwrap()),
                "Unknown"
            );
            let commits = vec![
                (put(&user("u1", "jack", &[]), 0), "hr".to_owned()),
                (put(&user("u2", "jack", &[]), 0), "hr".to_owned()),
                (put(&user("u3", "bad name", &[]), 0), "hr".to_owned()),
                (put(&user("u4", "will", &[]), 0), "hr".to_owned()),
            ];
            let results = s.dry_run(&commits, &hr).unwrap();
            assert!(results[0].is_ok());
            assert!(
                matches!(results[1], Err(StoreError::NameTaken { .. })),
                "sees the first"
            );
            assert!(matches!(results[2], Err(StoreError::Schema { .. })));
            assert!(results[3].is_ok());
            assert!(s.get_focus("u1").unwrap().is_none());
            assert!(s.get_focus("u4").unwrap().is_none());
            assert!(s.outbox_batch(10).unwrap().is_empty());
            assert_eq!(
                crate::status_word(&s.get_agreement("hr").unwrap().unwrap()),
                "Unknown"
            );
        }
    }

    fn role(id: &str, name: &str, includes: &[&str]) -> v1::Focus {
        let mut r = user(id, name, &[]);
        r.kind = "role".into();
        r.inducements = includes
            .iter()
            .map(|i| v1::Inducement {
                role: (*i).to_owned(),
                ..Default::default()
            })
            .collect();
        r
    }

    #[test]
    fn roles_are_the_idms_and_their_referrers_are_indexed() {
        for place in crate::testing::places() {
            let (s, hr, _crm, admin) = setup(&place);
            let err = s.commit(&put(&role("r1", "staff", &[]), 0), "", &hr);
            assert!(
                matches!(err, Err(StoreError::NotOwned { .. })),
                "an agreement made a role: {err:?}"
            );
            s.commit(&put(&role("r1", "staff", &[]), 0), "", &admin)
                .unwrap();
            s.commit(&put(&role("r2", "engineer", &["staff"]), 0), "", &admin)
                .unwrap();
            let mut jack = user("f1", "jack", &[]);
            jack.assignments.push(v1::Assignment {
                role: "staff".into(),
                source: "admin".into(),
                ..Default::default()
            });
            s.commit(&put(&jack, 0), "", &admin).unwrap();
            assert_eq!(
                s.role_referrers("staff").unwrap(),
                (vec!["f1".to_owned()], vec!["engineer".to_owned()])
            );
            // Assignments and inducements change: the index follows.
            jack.assignments.clear();
            s.commit(&put(&jack, 1), "", &admin).unwrap();
            s.commit(&put(&role("r2", "engineer", &[]), 1), "", &admin)
                .unwrap();
            assert_eq!(s.role_referrers("staff").unwrap(), (vec![], vec![]));
            // A deleted holder is no referrer.
            let mut will = user("f2", "will", &[]);
            will.assignments.push(v1::Assignment {
                role: "engineer".into(),
                source: "admin".into(),
                ..Default::default()
            });
            s.commit(&put(&will, 0), "", &admin).unwrap();
            assert_eq!(s.role_referrers("engineer").unwrap().0, ["f2"]);
            s.commit(&delete("f2", 1), "", &admin).unwrap();
            assert!(s.role_referrers("engineer").unwrap().0.is_empty());
        }
    }

    #[test]
    fn inducements_and_assignments_must_say_what_they_are() {
        for place in crate::testing::places() {
            let (s, _hr, _crm, admin) = setup(&place);
            let mut jack = user("f1", "jack", &[]);
            jack.inducements.push(v1::Inducement {
                resource: "acme".into(),
                ..Default::default()
            });
            let err = s.commit(&put(&jack, 0), "", &admin).unwrap_err();
            assert!(err.to_string().contains("only roles give"), "{err}");
            jack.inducements.clear();
            jack.assignments.push(v1::Assignment {
                resource: "acme".into(),
                role: "staff".into(),
                source: "admin".into(),
            });
            let err = s.commit(&put(&jack, 0), "", &admin).unwrap_err();
            assert!(
                err.to_string().contains("either a resource or a role"),
                "{err}"
            );
        }
    }
}
