//! Step-id hashing (§9): SHA-1 of the user's id, with `:n` suffixes for repeats.

use std::collections::HashMap;

use sha1::{Digest, Sha1};

/// Lower-case hex SHA-1 of a step id.
///
/// ```
/// assert_eq!(
///     cairn_protocol::step_id::hash("first step"),
///     "98bf98df193bcce7c33e6bc50927cf2ac21206cb"
/// );
/// ```
pub fn hash(id: &str) -> String {
    hex::encode(Sha1::digest(id.as_bytes()))
}

/// Counts the ids one execution has used, so that the n-th use of `id` becomes `id:n-1`.
///
/// A counter lives for one request: every call re-counts from zero in code order.
#[derive(Debug, Default)]
pub struct StepIdCounter {
    seen: HashMap<String, u32>,
}

/// A step id after the collision rule: what gets hashed and the `userland.index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedStepId {
    /// The hashed id the server knows the step by.
    pub hashed: String,
    /// `None` for the first use, `Some(n)` for the (n+1)-th.
    pub index: Option<u32>,
}

impl StepIdCounter {
    /// Resolves the next use of `id`.
    ///
    /// ```
    /// let mut c = cairn_protocol::step_id::StepIdCounter::default();
    /// assert_eq!(c.next("p").index, None);
    /// let second = c.next("p");
    /// assert_eq!(second.index, Some(1));
    /// assert_eq!(second.hashed, cairn_protocol::step_id::hash("p:1"));
    /// ```
    pub fn next(&mut self, id: &str) -> ResolvedStepId {
        let count = self.seen.entry(id.to_string()).or_insert(0);
        let index = *count;
        *count += 1;
        if index == 0 {
            ResolvedStepId {
                hashed: hash(id),
                index: None,
            }
        } else {
            ResolvedStepId {
                hashed: hash(&format!("{id}:{index}")),
                index: Some(index),
            }
        }
    }
}
