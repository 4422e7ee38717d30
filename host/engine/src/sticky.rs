//! The one hash that assigns a client to a route by a key it sends: the graph splitter and
//! rollouts both use it, so the same key means the same ticket everywhere, across restarts
//! and Rust releases (std's hasher is neither stable nor meant for this).

/// A stable 64-bit hash of a sticky value: FNV-1a, then splitmix64's finalizer so that keys
/// differing in one character spread over every ticket.
pub fn sticky_hash(value: &str) -> u64 {
    sticky_hash_scoped(&[], value)
}

/// [`sticky_hash`] of `scope`, a zero byte, then `value`, without building that string: a
/// rollout hashes its own name with the key so two rollouts split the same clients apart.
pub fn sticky_hash_scoped(scope: &[u8], value: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let separator: &[u8] = if scope.is_empty() { &[] } else { &[0] };
    for &byte in scope.iter().chain(separator).chain(value.as_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

/// splitmix64's finalizer: spreads a counter or a hash over all 64 bits.
pub fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_and_spreads() {
        // Pinned: a change here would move every sticky client to another route.
        assert_eq!(sticky_hash("user-1"), sticky_hash("user-1"));
        assert_eq!(sticky_hash(""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(sticky_hash_scoped(b"r", "u"), sticky_hash("r\u{0}u"));
        assert_ne!(sticky_hash_scoped(b"r", "u"), sticky_hash_scoped(b"s", "u"));
        let mut tickets = [0usize; 10];
        for key in 0..10_000 {
            tickets[(sticky_hash(&format!("user-{key}")) % 10) as usize] += 1;
        }
        assert!(
            tickets.iter().all(|&count| (800..1200).contains(&count)),
            "{tickets:?}"
        );
    }
}
