//! Who the client is behind a reverse proxy: the TCP peer, unless it is a
//! proxy the operator trusts, in which case the address that proxy (and the
//! trusted ones before it) recorded in `X-Forwarded-For`.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address, or a network in CIDR form: `192.0.2.7`, `10.0.0.0/8`,
/// `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (such as 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's address: the TCP peer's; when the peer is one of `trusted`,
/// the right-most address of `X-Forwarded-For` that is not itself trusted.
/// Each proxy appends the address it saw, so the hops are read from the
/// right: trusted proxies are passed over, and the first other hop is the
/// client. Anything further left is the client's own claim and is never
/// read, so a client cannot choose its address, nor, with a hop that does
/// not parse, make itself the proxy. Without a usable hop, the peer.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = peer?;
    if !is_trusted(peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.into_iter().rev() {
        match parse_hop(hop) {
            Some(ip) if is_trusted(ip) => continue,
            Some(ip) => return Some(ip),
            // A trusted proxy wrote what it could not name (`unknown`, a
            // socket path): the peer is the best we know.
            None => break,
        }
    }
    Some(peer)
}

/// One hop of `X-Forwarded-For`: an address, with or without a port
/// (`192.0.2.1:5000`, `[2001:db8::1]:5000`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(socket) = hop.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|n| n.parse().ok()).collect()
    }

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap_or(IpNet {
            addr: IpAddr::from([0, 0, 0, 0]),
            prefix: 32,
        });
        assert!(net.contains("10.200.3.4".parse().unwrap_or(net.addr)));
        assert!(!net.contains(IpAddr::from([11, 0, 0, 1])));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap_or(net.addr)));
        assert_eq!(nets(&["2001:db8::/32"]).len(), 1);
        assert!(nets(&["2001:db8::/32"])[0].contains("2001:db8:ff::1".parse().unwrap_or(net.addr)));
        assert!(nets(&["0.0.0.0/0"])[0].contains(IpAddr::from([203, 0, 113, 9])));
        for bad in ["10.0.0.0/33", "nowhere", "10.0.0.0/x", "::/129", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_forwarded_it() {
        let trusted = nets(&["10.0.0.0/8"]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.7, 10.0.0.2"
                .parse()
                .unwrap_or_else(|_| axum::http::HeaderValue::from_static("")),
        );
        let proxy = Some(IpAddr::from([10, 0, 0, 1]));
        // The right-most untrusted hop; the left one is the client's own claim.
        assert_eq!(
            client_address(proxy, &headers, &trusted),
            Some(IpAddr::from([203, 0, 113, 7]))
        );
        // An untrusted peer's header proves nothing.
        let direct = Some(IpAddr::from([192, 0, 2, 5]));
        assert_eq!(client_address(direct, &headers, &trusted), direct);
        assert_eq!(client_address(proxy, &headers, &[]), proxy);
        // Garbage the client put on the left is never read: it cannot make
        // the proxy's own address take its failures.
        let hop = |v: &'static str| axum::http::HeaderValue::from_static(v);
        headers.insert("x-forwarded-for", hop("x, 203.0.113.9:5123"));
        assert_eq!(
            client_address(proxy, &headers, &trusted),
            Some(IpAddr::from([203, 0, 113, 9]))
        );
        headers.insert("x-forwarded-for", hop("[2001:db8::7]:443"));
        assert_eq!(
            client_address(proxy, &headers, &trusted),
            "2001:db8::7".parse().ok()
        );
        // No header, or a hop the proxy could not name: the proxy itself.
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted), proxy);
        headers.insert("x-forwarded-for", hop("203.0.113.9, unknown"));
        assert_eq!(client_address(proxy, &headers, &trusted), proxy);
    }
}
