//! The SSRF guard: callback URLs come from callers, so a delivery must not be able to reach the
//! service's own network. The check runs on the addresses the connection will actually use: the
//! HTTP client resolves names through [`GuardedResolver`], which drops refused addresses, so a
//! name that resolves to a public address when validated and to a private one later (DNS
//! rebinding) is still refused. URLs naming an IP literal are checked before sending.
//!
//! Refused unless `webhook_allow_private = true`: loopback, private (RFC 1918, unique local),
//! shared (100.64/10), IPv4-mapped and NAT64 forms of them. Always refused: link-local (the cloud
//! metadata range 169.254/16 among them), multicast, broadcast and unspecified addresses.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether an address may be delivered to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Refused unless private destinations are allowed.
    Private,
    /// Refused whatever the configuration says.
    Forbidden,
}

/// The guard's rule, given whether private destinations are allowed.
#[derive(Clone, Copy, Debug)]
pub struct Guard {
    pub allow_private: bool,
}

impl Guard {
    pub fn permits(&self, ip: IpAddr) -> bool {
        match classify(ip) {
            Verdict::Allowed => true,
            Verdict::Private => self.allow_private,
            Verdict::Forbidden => false,
        }
    }
}

pub fn classify(ip: IpAddr) -> Verdict {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            // Embedded IPv4 addresses (::ffff:a.b.c.d, 64:ff9b::a.b.c.d) are what gets reached.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return classify_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            classify_v6(v6)
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Verdict {
    let [a, b, ..] = ip.octets();
    if ip.is_link_local() || ip.is_multicast() || ip.is_broadcast() || ip.is_unspecified() || a == 0
    {
        Verdict::Forbidden
    } else if ip.is_loopback() || ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Verdict::Private
    } else {
        Verdict::Allowed
    }
}

fn classify_v6(ip: Ipv6Addr) -> Verdict {
    let first = ip.segments()[0];
    let link_local = first & 0xffc0 == 0xfe80;
    // fd00:ec2::254 is a cloud metadata address inside the unique-local range.
    let metadata = ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    if link_local || metadata || ip.is_multicast() || ip.is_unspecified() {
        Verdict::Forbidden
    } else if ip.is_loopback() || first & 0xfe00 == 0xfc00 {
        Verdict::Private
    } else {
        Verdict::Allowed
    }
}

/// The error a refused name fails with; the deliverer finds it in the error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("the destination resolves only to refused addresses")]
pub struct RefusedDestination;

/// Resolves names with the system resolver and keeps only the addresses the guard permits.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    pub guard: Guard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| guard.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(
                    Box::new(RefusedDestination) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

impl GuardedResolver {
    pub fn shared(guard: Guard) -> Arc<Self> {
        Arc::new(Self { guard })
    }
}

/// True when `error` (or what caused it) is a [`RefusedDestination`].
pub fn is_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<RefusedDestination>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Verdict {
        classify(s.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(v(public), Verdict::Allowed, "{public}");
        }
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::7f00:1",
        ] {
            assert_eq!(v(private), Verdict::Private, "{private}");
        }
        for forbidden in [
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.2.3",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert_eq!(v(forbidden), Verdict::Forbidden, "{forbidden}");
        }
        assert_eq!(v("172.32.0.1"), Verdict::Allowed);
        assert_eq!(v("100.128.0.1"), Verdict::Allowed);
    }

    #[test]
    fn allow_private_never_opens_the_metadata_range() {
        let open = Guard {
            allow_private: true,
        };
        let closed = Guard {
            allow_private: false,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(open.permits(ip("127.0.0.1")) && !closed.permits(ip("127.0.0.1")));
        assert!(open.permits(ip("10.0.0.1")) && !closed.permits(ip("10.0.0.1")));
        assert!(!open.permits(ip("169.254.169.254")));
        assert!(!open.permits(ip("::ffff:169.254.169.254")));
        assert!(open.permits(ip("8.8.8.8")) && closed.permits(ip("8.8.8.8")));
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let resolver = GuardedResolver {
            guard: Guard {
                allow_private: false,
            },
        };
        let err = resolver
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost is loopback only");
        assert!(is_refused(&*err));
        let open = GuardedResolver {
            guard: Guard {
                allow_private: true,
            },
        };
        let addrs: Vec<SocketAddr> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
