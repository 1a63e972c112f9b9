//! The pool of loopback addresses machines get.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Why an `ip_pool` setting is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ip_pool {value:?}: {reason}")]
pub struct IpPoolError {
    pub value: String,
    pub reason: &'static str,
}

/// A range of IPv4 addresses given as a CIDR, without its network and
/// broadcast addresses (a /31 or /32 has neither and hands out every address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPool {
    first: u32,
    last: u32,
}

impl IpPool {
    /// Parses `a.b.c.d/len`. Host bits in the address are ignored
    /// (`127.77.0.5/16` is `127.77.0.0/16`). The range must lie inside
    /// `127.0.0.0/8`: machines bind their agent to these addresses.
    pub fn parse(cidr: &str) -> Result<Self, IpPoolError> {
        let err = |reason| IpPoolError {
            value: cidr.to_string(),
            reason,
        };
        let (addr, len) = cidr
            .trim()
            .split_once('/')
            .ok_or_else(|| err("expected an IPv4 CIDR such as 127.77.0.0/16"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| err("the address is not an IPv4 address"))?;
        let len: u32 = match len.parse() {
            Ok(n) if n <= 32 => n,
            _ => return Err(err("the prefix length must be a number from 0 to 32")),
        };
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        let network = u32::from(addr) & mask;
        let broadcast = network | !mask;
        if len < 8 || network >> 24 != 127 {
            return Err(err("the range must lie inside 127.0.0.0/8 (loopback)"));
        }
        let (first, last) = if len >= 31 {
            (network, broadcast)
        } else {
            (network + 1, broadcast - 1)
        };
        Ok(Self { first, last })
    }

    /// How many addresses the pool hands out.
    pub fn size(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// The lowest address of the pool not in `used`.
    pub fn lowest_free(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        // `used` is sorted: walk both in step instead of probing every address.
        let mut candidate = self.first;
        for ip in used.range(Ipv4Addr::from(self.first)..=Ipv4Addr::from(self.last)) {
            let ip = u32::from(*ip);
            if ip > candidate {
                break;
            }
            if ip == candidate {
                if candidate == self.last {
                    return None;
                }
                candidate += 1;
            }
        }
        Some(Ipv4Addr::from(candidate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    #[test]
    fn skips_network_and_broadcast() {
        let pool = IpPool::parse("127.77.0.0/30").expect("valid");
        assert_eq!(pool.size(), 2);
        let mut used = BTreeSet::new();
        assert_eq!(pool.lowest_free(&used), Some(ip("127.77.0.1")));
        used.insert(ip("127.77.0.1"));
        assert_eq!(pool.lowest_free(&used), Some(ip("127.77.0.2")));
        used.insert(ip("127.77.0.2"));
        assert_eq!(pool.lowest_free(&used), None);
        assert!(!pool.contains(ip("127.77.0.0")));
        assert!(!pool.contains(ip("127.77.0.3")));
    }

    #[test]
    fn fills_gaps_lowest_first() {
        let pool = IpPool::parse("127.77.5.9/24").expect("host bits are ignored");
        assert_eq!(pool.size(), 254);
        let used: BTreeSet<_> = ["127.77.5.1", "127.77.5.2", "127.77.5.4", "127.1.1.1"]
            .into_iter()
            .map(ip)
            .collect();
        assert_eq!(pool.lowest_free(&used), Some(ip("127.77.5.3")));
    }

    #[test]
    fn tiny_prefixes_use_every_address() {
        assert_eq!(IpPool::parse("127.9.9.9/32").expect("valid").size(), 1);
        assert_eq!(IpPool::parse("127.9.9.8/31").expect("valid").size(), 2);
        assert_eq!(
            IpPool::parse("127.0.0.0/8").expect("valid").size(),
            (1 << 24) - 2
        );
    }

    #[test]
    fn rejects_bad_cidrs_with_a_reason() {
        for bad in [
            "",
            "127.77.0.0",
            "127.77.0/16",
            "127.77.0.0/33",
            "127.77.0.0/x",
            "::1/128",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "127.0.0.0/7",
        ] {
            let err = IpPool::parse(bad).expect_err(bad);
            assert_eq!(err.value, bad);
            assert!(err.to_string().contains("invalid ip_pool"), "{err}");
        }
    }
}
