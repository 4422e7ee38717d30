//! The one hash that assigns a client to a route by a key it sends: the graph splitter and
//! rollouts both use it, so the same key means the same ticket everywhere, across restarts
//! and Rust releases (std's hasher is neither stable nor meant for this).

/// A stable 64-bit hash of a sticky value: FNV-1a, then splitmix64's finalizer so that keys
/// differing in one character spread over every ticket.
pub fn sticky_hash(value: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in value.bytes() {
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
