//! Request signing (§3.2) and signing-key hashing (§3.4).
//!
//! The MAC key is the signing key's hex text with its `signkey-<env>-` prefix removed (not
//! hex-decoded), and the message is the RFC 8785 canonical form of the body followed by the
//! decimal Unix timestamp. Signing anything but the canonical form fails against the real SDKs.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Largest allowed distance between a signature's timestamp and now.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Inngest-Signature header")]
    Missing,
    #[error("malformed X-Inngest-Signature header")]
    Malformed,
    #[error("signature has expired")]
    Expired,
    #[error("signature does not match")]
    Mismatch,
    #[error("body is not valid JSON: {0}")]
    Body(String),
}

/// Removes a `signkey-<env>-` prefix, if there is one.
///
/// ```
/// use cairn_protocol::signature::strip_key_prefix;
/// assert_eq!(strip_key_prefix("signkey-prod-abcd"), "abcd");
/// assert_eq!(strip_key_prefix("abcd"), "abcd");
/// ```
pub fn strip_key_prefix(key: &str) -> &str {
    key_prefix(key).map_or(key, |p| &key[p.len()..])
}

/// The `signkey-<env>-` prefix of a key, if it has one (`^signkey-\w+-`).
fn key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("signkey-")?;
    let env_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|&n| n > 0)?;
    rest[env_len..]
        .starts_with('-')
        .then(|| &key[.."signkey-".len() + env_len + 1])
}

/// RFC 8785 canonical JSON of a value.
pub fn canonical_json<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // serde_jcs only fails on serialisation errors of the value itself, which serde_json
    // values and our own types never produce.
    serde_jcs::to_vec(value).expect("canonical JSON of a serialisable value")
}

/// Canonicalises raw body bytes; an empty body stays empty.
pub fn canonicalize_bytes(body: &[u8]) -> Result<Vec<u8>, SignatureError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| SignatureError::Body(e.to_string()))?;
    Ok(canonical_json(&value))
}

fn mac_hex(key: &str, canonical_body: &[u8], t: i64) -> String {
    let mut mac = HmacSha256::new_from_slice(strip_key_prefix(key).as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(canonical_body);
    mac.update(t.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The `X-Inngest-Signature` value for an already-canonical body at Unix time `t` (seconds).
///
/// ```
/// let key = "signkey-test-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// let sig = cairn_protocol::signature::sign(key, br#"{"a":1}"#, 1_700_000_000);
/// assert_eq!(sig, "t=1700000000&s=6f935f4999a22697d3186d2f528b9ba93bd1bce44e799b690985927c66c072d2");
/// ```
pub fn sign(key: &str, canonical_body: &[u8], t: i64) -> String {
    format!("t={t}&s={}", mac_hex(key, canonical_body, t))
}

/// Signs a response body as the SDKs do: the exact bytes, no canonicalisation.
pub fn sign_raw(key: &str, body: &[u8], t: i64) -> String {
    sign(key, body, t)
}

/// Splits a signature header into its timestamp and hex MAC.
fn parse_header(header: &str) -> Result<(i64, &str), SignatureError> {
    let mut t = None;
    let mut s = None;
    for part in header.split('&') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("s", v)) => s = Some(v),
            _ => {}
        }
    }
    match (t, s) {
        (Some(t), Some(s)) if !s.is_empty() => Ok((t, s)),
        _ => Err(SignatureError::Malformed),
    }
}

/// Verifies a request signature against one or more keys (primary first, then fallback).
///
/// Returns the index of the key that matched, so the caller can sign its answer with it.
/// `now` is Unix seconds; timestamps more than five minutes away either way are refused.
///
/// ```
/// use cairn_protocol::signature::{sign, verify};
/// let key = "signkey-test-00ff";
/// let header = sign(key, br#"{"a":1}"#, 1_700_000_000);
/// // The raw body is canonicalised before checking, so key order does not matter.
/// assert_eq!(verify(Some(&header), br#"{ "a": 1 }"#, &[key], 1_700_000_010), Ok(0));
/// ```
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    keys: &[&str],
    now: i64,
) -> Result<usize, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let (t, given) = parse_header(header)?;
    if (now - t).abs() > MAX_SKEW_SECS {
        return Err(SignatureError::Expired);
    }
    let canonical = canonicalize_bytes(body)?;
    keys.iter()
        .position(|key| {
            let expected = mac_hex(key, &canonical, t);
            bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
        })
        .ok_or(SignatureError::Mismatch)
}

/// The bearer token an SDK sends to the server API: `sha256(hexdecode(key))`, keeping the prefix.
///
/// Returns `None` when the key (without prefix) is not valid hex.
///
/// ```
/// assert_eq!(
///     cairn_protocol::signature::hash_signing_key("signkey-prod-12345678").unwrap(),
///     "signkey-prod-b2ed992186a5cb19f6668aade821f502c1d00970dfd0e35128d51bac4649916c"
/// );
/// ```
pub fn hash_signing_key(key: &str) -> Option<String> {
    let prefix = key_prefix(key).unwrap_or("");
    let raw = hex::decode(strip_key_prefix(key)).ok()?;
    Some(format!("{prefix}{}", hex::encode(Sha256::digest(raw))))
}

/// Checks a bearer token against the server's signing key, accepting the plain key or its
/// hash, with or without a `signkey-*-` prefix on either side (§3.4). Constant time.
///
/// ```
/// use cairn_protocol::signature::{bearer_matches, hash_signing_key};
/// let key = "signkey-prod-12345678";
/// let hashed = hash_signing_key(key).unwrap();
/// assert!(bearer_matches(&hashed, key));
/// assert!(bearer_matches("12345678", key));
/// assert!(!bearer_matches("deadbeef", key));
/// ```
pub fn bearer_matches(token: &str, signing_key: &str) -> bool {
    let token = strip_key_prefix(token.trim()).as_bytes();
    let plain = strip_key_prefix(signing_key);
    let hashed = hash_signing_key(plain).unwrap_or_default();
    let by_plain: bool = token.ct_eq(plain.as_bytes()).into();
    let by_hash: bool = token.ct_eq(hashed.as_bytes()).into();
    by_plain | by_hash
}

/// `sha256(utf8(event_key))` as hex, for introspection's `event_key_hash`.
pub fn hash_event_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
