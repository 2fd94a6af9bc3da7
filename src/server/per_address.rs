//! `--max-per-ip`: how many connections each IP address holds, so one host cannot take every
//! slot. Addresses in `--max-per-ip-exempt` are not limited (the local host by default).

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug)]
pub struct PerAddress {
    /// Connections one address may hold; 0: no limit.
    limit: usize,
    exempt: Vec<IpAddr>,
    counts: HashMap<IpAddr, usize>,
}

impl PerAddress {
    pub fn new(limit: usize, exempt: &[IpAddr]) -> Self {
        PerAddress {
            limit,
            exempt: exempt.iter().map(IpAddr::to_canonical).collect(),
            counts: HashMap::new(),
        }
    }

    /// The limit, if `ip` already holds that many connections.
    pub fn full(&self, ip: IpAddr) -> Option<usize> {
        let ip = ip.to_canonical();
        let held = self.counts.get(&ip).copied().unwrap_or(0);
        let limited = self.limit > 0 && !self.exempt.contains(&ip);
        (limited && held >= self.limit).then_some(self.limit)
    }

    pub fn connected(&mut self, ip: IpAddr) {
        *self.counts.entry(ip.to_canonical()).or_default() += 1;
    }

    pub fn disconnected(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(held) = self.counts.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                self.counts.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_full_at_the_limit_unless_exempt() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let mut per_address = PerAddress::new(2, &[local]);
        for _ in 0..3 {
            per_address.connected(local);
        }
        assert_eq!(per_address.full(local), None, "exempt");
        per_address.connected(other);
        assert_eq!(per_address.full(other), None);
        per_address.connected(other);
        assert_eq!(per_address.full(other), Some(2));
        // The same address seen through an IPv6 socket counts together.
        assert_eq!(
            per_address.full("::ffff:127.0.0.2".parse().unwrap()),
            Some(2)
        );
        per_address.disconnected(other);
        assert_eq!(per_address.full(other), None);
    }

    #[test]
    fn zero_means_no_limit() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut per_address = PerAddress::new(0, &[]);
        for _ in 0..100 {
            per_address.connected(ip);
        }
        assert_eq!(per_address.full(ip), None);
    }
}
