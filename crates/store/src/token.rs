//! Credentials: sync tokens the IDM issues and signs, and the administrator
//! credential it is configured with.
//!
//! A sync token reads `idsync1.<payload>.<signature>`: the payload (base64url)
//! names its purpose, agreement, id and issue time; the signature is an
//! HMAC-SHA256 under the store's own key, so a token from another IDM, or an
//! edited one, fails before anything is looked up. The store keeps only the
//! SHA-256 of each token, under its id, so a token is also refused once its
//! record is gone (revoked, or its agreement ended). No error here ever
//! contains the token or part of it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac, rand};

/// First part of every sync token: format version 1.
pub const SYNC_PREFIX: &str = "idsync1";
/// First part of an administrator credential made by [`new_admin_credential`].
pub const ADMIN_PREFIX: &str = "idsync-admin";

/// Why a presented credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no credential: send `authorization: Bearer <token>`")]
    Missing,
    #[error("the credential is not a sync token (expected idsync1.<payload>.<signature>)")]
    Malformed,
    #[error("the token was not issued by this IDM: its signature does not verify")]
    Forged,
    #[error(
        "the token's agreement {agreement:?} does not exist (never created, finalised or terminated)"
    )]
    NoAgreement { agreement: String },
    #[error("token {id} of agreement {agreement:?} has been revoked")]
    Revoked { agreement: String, id: String },
    #[error("the administrator credential does not match")]
    BadAdmin,
    /// The token could not be checked: the store failed.
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

/// What a verified sync token says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub agreement: String,
    pub id: String,
    pub issued_ms: i64,
}

/// 32 random bytes from the operating system.
///
/// # Errors
/// The system's random source fails.
pub fn random_key() -> Result<[u8; 32], String> {
    rand::generate::<[u8; 32]>(&rand::SystemRandom::new())
        .map(|k| k.expose())
        .map_err(|_| "the system random source failed".to_owned())
}

/// A new token id: 16 random bytes, base64url.
///
/// # Errors
/// The system's random source fails.
pub fn new_id() -> Result<String, String> {
    let key = random_key()?;
    Ok(URL_SAFE_NO_PAD.encode(&key[..16]))
}

/// A fresh administrator credential, for `idsync admin new-credential`.
///
/// # Errors
/// The system's random source fails.
pub fn new_admin_credential() -> Result<String, String> {
    Ok(format!(
        "{ADMIN_PREFIX}.{}",
        URL_SAFE_NO_PAD.encode(random_key()?)
    ))
}

/// Signs a sync token for `claims` under `key`.
pub fn issue(key: &[u8], claims: &Claims) -> String {
    let payload = format!(
        "sync:{}:{}:{}",
        claims.agreement, claims.id, claims.issued_ms
    );
    let payload = URL_SAFE_NO_PAD.encode(payload);
    let signed = format!("{SYNC_PREFIX}.{payload}");
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Checks the form and signature of a sync token and reads its claims. The
/// caller still checks that the token's record exists ([`hash`]).
///
/// # Errors
/// [`TokenError::Malformed`] or [`TokenError::Forged`].
pub fn verify(key: &[u8], token: &str) -> Result<Claims, TokenError> {
    let (signed, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (prefix, payload) = signed.split_once('.').ok_or(TokenError::Malformed)?;
    if prefix != SYNC_PREFIX {
        return Err(TokenError::Malformed);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        signed.as_bytes(),
        &signature,
    )
    .map_err(|_| TokenError::Forged)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
    let mut parts = payload.split(':');
    let (Some("sync"), Some(agreement), Some(id), Some(issued), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    Ok(Claims {
        agreement: agreement.to_owned(),
        id: id.to_owned(),
        issued_ms: issued.parse().map_err(|_| TokenError::Malformed)?,
    })
}

/// What the store keeps of a token.
pub fn hash(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Compares a presented administrator credential with the configured one
/// without leaking, through timing, how much of it matched.
#[derive(Clone)]
pub struct AdminCredential {
    key: hmac::Key,
    tag: Vec<u8>,
}

impl std::fmt::Debug for AdminCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminCredential(***)")
    }
}

impl AdminCredential {
    /// # Errors
    /// The system's random source fails.
    pub fn new(credential: &str) -> Result<Self, String> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &random_key()?);
        let tag = hmac::sign(&key, credential.as_bytes()).as_ref().to_vec();
        Ok(Self { key, tag })
    }

    pub fn matches(&self, presented: &str) -> bool {
        hmac::verify(&self.key, presented.as_bytes(), &self.tag).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            agreement: "hr".into(),
            id: "abc".into(),
            issued_ms: 42,
        }
    }

    #[test]
    fn an_issued_token_verifies_and_keeps_its_claims() {
        let key = random_key().unwrap();
        let token = issue(&key, &claims());
        assert!(token.starts_with("idsync1."));
        assert_eq!(verify(&key, &token).unwrap(), claims());
    }

    #[test]
    fn another_key_or_an_edit_is_forged_and_garbage_is_malformed() {
        let key = random_key().unwrap();
        let token = issue(&key, &claims());
        let other = random_key().unwrap();
        assert_eq!(verify(&other, &token), Err(TokenError::Forged));
        // Re-sign a payload naming another agreement with a key we do not hold.
        let forged = issue(
            &other,
            &Claims {
                agreement: "crm".into(),
                ..claims()
            },
        );
        assert_eq!(verify(&key, &forged), Err(TokenError::Forged));
        for bad in ["", "idsync1", "idsync1.x", "nope.x.y", "idsync1.%%.%%"] {
            assert_eq!(verify(&key, bad), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn errors_never_contain_the_token() {
        let key = random_key().unwrap();
        let token = issue(&key, &claims());
        let other = random_key().unwrap();
        let e = verify(&other, &token).unwrap_err().to_string();
        let secret_part = token.rsplit('.').next().unwrap();
        assert!(!e.contains(secret_part), "{e}");
    }

    #[test]
    fn the_admin_credential_matches_only_itself() {
        let c = new_admin_credential().unwrap();
        let admin = AdminCredential::new(&c).unwrap();
        assert!(admin.matches(&c));
        assert!(!admin.matches(&format!("{c}x")));
        assert!(!admin.matches(""));
        assert_eq!(format!("{admin:?}"), "AdminCredential(***)");
    }
}
