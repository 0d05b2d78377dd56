//! Client address resolution and per-credential IP allowlists.

use ipnet::IpNet;
use std::net::IpAddr;

/// Parses an allowlist entry: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a
/// single address (taken as /32 or /128).
pub fn parse_allowed(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        // `10.1.2.3/8` is almost always a typo for `10.0.0.0/8`; say so.
        if net.trunc() != net {
            return Err(format!(
                "'{s}' has host bits set; did you mean '{}'?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{s}' is not an IP address or CIDR"))
}

/// Parses Envoy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`) or a bare address.
pub fn parse_socket_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    // Envoy's usual `a.b.c.d:port`: one ':' is never an IPv6 address (they
    // have two or more) nor IPv4 (none), so the whole-string parse below
    // would fail; straight to the address before the port.
    if !s.starts_with('[') && s.bytes().filter(|&b| b == b':').count() == 1 {
        return s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

/// The client address: with `trusted_hops` = 0 the peer; with N > 0 the Nth
/// X-Forwarded-For entry from the right (each trusted proxy appends the
/// address it saw). Too few entries or a malformed one → unknown (None), which
/// no allowlist admits.
pub fn client_ip(peer: Option<&str>, xff: Option<&[u8]>, trusted_hops: u32) -> Option<IpAddr> {
    if trusted_hops == 0 {
        return peer.and_then(parse_socket_ip).map(canonical);
    }
    let xff = std::str::from_utf8(xff?).ok()?;
    let entry = xff.rsplit(',').nth(trusted_hops as usize - 1)?;
    parse_socket_ip(entry).map(canonical)
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`) is matched as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An empty allowlist admits any address; otherwise the address must be known
/// and inside one of the networks.
pub fn is_allowed(allow: &[IpNet], ip: Option<IpAddr>) -> bool {
    allow.is_empty() || ip.is_some_and(|ip| allow.iter().any(|n| n.contains(&ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parse before the `a.b.c.d:port` shortcut, kept to check it.
    fn parse_without_shortcut(s: &str) -> Option<IpAddr> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(ip);
        }
        if let Some(rest) = s.strip_prefix('[') {
            return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
        }
        s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
    }

    #[test]
    fn the_ipv4_port_shortcut_parses_as_before() {
        for s in [
            "127.0.0.1:54321",
            " 10.0.0.1:80 ",
            "10.0.0.1",
            "10.0.0.1:",
            ":80",
            "::1",
            "[::1]:80",
            "[10.0.0.1]:80",
            "::ffff:10.0.0.1",
            "[::ffff:10.0.0.1]:443",
            "2001:db8::1",
            "host:80",
            "1.2.3.4:5:6",
            "",
            ":",
            "[",
            "1.2.3.999:80",
        ] {
            assert_eq!(parse_socket_ip(s), parse_without_shortcut(s), "{s:?}");
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_allowed(s).unwrap()).collect()
    }

    #[test]
    fn allowlist_matches_ipv4_and_ipv6_cidrs() {
        let allow = nets(&["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"]);
        assert!(is_allowed(&allow, "10.2.3.4".parse().ok()));
        assert!(is_allowed(&allow, "192.168.1.7".parse().ok()));
        assert!(!is_allowed(&allow, "192.168.1.8".parse().ok()));
        assert!(is_allowed(&allow, "2001:db8::1".parse().ok()));
        assert!(!is_allowed(&allow, "2001:db9::1".parse().ok()));
        assert!(!is_allowed(&allow, None));
        assert!(is_allowed(&[], None));
    }

    #[test]
    fn parse_allowed_rejects_garbage_and_host_bits() {
        assert!(parse_allowed("10.0.0/8").is_err());
        assert!(parse_allowed("10.1.2.3/8")
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!(parse_allowed("::1").is_ok());
    }

    #[test]
    fn socket_addresses_parse_in_both_families() {
        assert_eq!(parse_socket_ip("127.0.0.1:4000"), "127.0.0.1".parse().ok());
        assert_eq!(parse_socket_ip("[::1]:4000"), "::1".parse().ok());
        assert_eq!(parse_socket_ip("::1"), "::1".parse().ok());
        assert_eq!(parse_socket_ip("nonsense"), None);
    }

    #[test]
    fn xff_is_ignored_without_trusted_hops() {
        let ip = client_ip(Some("127.0.0.1:1"), Some(b"10.0.0.1"), 0);
        assert_eq!(ip, "127.0.0.1".parse().ok());
    }

    #[test]
    fn trusted_hops_pick_from_the_right_of_xff() {
        let xff: &[u8] = b"6.6.6.6, 10.0.0.1, 172.16.0.1";
        assert_eq!(
            client_ip(Some("127.0.0.1:1"), Some(xff), 1),
            "172.16.0.1".parse().ok()
        );
        assert_eq!(client_ip(None, Some(xff), 2), "10.0.0.1".parse().ok());
        assert_eq!(client_ip(None, Some(xff), 4), None);
        assert_eq!(client_ip(None, None, 1), None);
        assert_eq!(client_ip(None, Some(b"garbage"), 1), None);
    }

    #[test]
    fn ipv4_mapped_ipv6_peer_matches_ipv4_rule() {
        let ip = client_ip(Some("[::ffff:10.0.0.5]:80"), None, 0);
        assert!(is_allowed(&nets(&["10.0.0.0/24"]), ip));
    }
}
